//! The LoRA training loop: AdamW with warmup and linear decay, gradient accumulation, label smoothing,
//! evaluation on the validation split after every epoch, early stopping on macro-F1 with patience, and the
//! best epoch's adapter as the result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Device;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use super::data::{pad, Example, Rng};
use super::eval::{evaluate, Evaluation};
use super::lora::{cross_entropy, LoraTrainable};
use crate::model::lora::{Adapter, Target};
use crate::model::{Bert, CpuEncoder, ModelError};

/// Hyperparameters of a LoRA job; every field has the project's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    pub alpha: f64,
    /// Linears to adapt.
    pub targets: Vec<Target>,
    /// Peak learning rate (LoRA wants ~10× full fine-tuning's; see docs).
    pub learning_rate: f64,
    /// Passes over the training split.
    pub epochs: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accumulation: usize,
    /// Fraction of steps spent warming the learning rate up linearly; it then decays linearly to 0.
    pub warmup_ratio: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Label smoothing of the cross-entropy.
    pub label_smoothing: f64,
    /// Tokens per example, special tokens included.
    pub max_length: usize,
    /// Epochs without a better validation macro-F1 before stopping.
    pub patience: usize,
    /// Fraction of each label held out for validation.
    pub val_fraction: f64,
    /// Seed of initialisation, split and shuffles.
    pub seed: u64,
    /// Start from the task's stable generation when it is a LoRA `[CLS]` adapter (its rank and targets then
    /// replace `rank` and `targets`); otherwise from fresh factors.
    pub warm_start: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: vec![Target::Query, Target::Value],
            learning_rate: 2e-3,
            epochs: 5,
            batch_size: 16,
            grad_accumulation: 1,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            label_smoothing: 0.1,
            max_length: 128,
            patience: 3,
            val_fraction: 0.15,
            seed: 0,
            warm_start: true,
        }
    }
}

impl TrainConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: &str| Err(TrainError::Invalid(m.to_owned()));
        if self.rank == 0 || self.rank > 256 {
            return bad("rank must be 1 to 256");
        }
        if self.targets.is_empty() {
            return bad("targets must name at least one linear");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            return bad("learning_rate must be in (0, 1)");
        }
        if self.epochs == 0 || self.epochs > 100 || self.batch_size == 0 || self.batch_size > 512 {
            return bad("epochs must be 1 to 100 and batch_size 1 to 512");
        }
        if self.grad_accumulation == 0 || self.grad_accumulation > 64 {
            return bad("grad_accumulation must be 1 to 64");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) || !(0.0..1.0).contains(&self.label_smoothing) {
            return bad("warmup_ratio and label_smoothing must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&self.weight_decay) || !(0.05..=0.5).contains(&self.val_fraction) {
            return bad("weight_decay must be in [0, 1] and val_fraction in [0.05, 0.5]");
        }
        if !(8..=512).contains(&self.max_length) {
            return bad("max_length must be 8 to 512");
        }
        Ok(())
    }
}

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The job's inputs are unusable.
    #[error("{0}")]
    Invalid(String),
    /// The job was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The tensor library failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(ModelError::Candle(e))
    }
}

/// Progress reported after every optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: usize,
    /// Optimizer steps planned.
    pub total_steps: usize,
    /// Current epoch (1-based).
    pub epoch: usize,
    /// Mean training loss of the epoch so far.
    pub train_loss: f64,
    /// The latest validation scores, once an epoch has finished.
    pub val: Option<Evaluation>,
}

/// One epoch's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Validation scores.
    pub val: Evaluation,
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The best epoch's adapter.
    pub adapter: Adapter,
    /// The epoch it came from.
    pub best_epoch: usize,
    /// Its validation scores.
    pub val: Evaluation,
    /// Every epoch.
    pub history: Vec<EpochReport>,
    /// Trainable values.
    pub trainable_params: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Wall time.
    pub wall_seconds: f64,
}

/// Sets flush-to-zero and denormals-are-zero on the calling thread and on every thread of rayon's pool,
/// which runs candle's matmuls: denormals slow AdamW's later steps by an order of magnitude.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(deprecated)]
        fn set() {
            // SAFETY: only the FTZ (bit 15) and DAZ (bit 6) flags of this thread's MXCSR change.
            unsafe {
                use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
                _mm_setcsr(_mm_getcsr() | 0x8040);
            }
        }
        set();
        rayon::broadcast(|_| set());
    }
}

/// Class probabilities of `examples` under `adapter`, computed by the fused serving path in chunks.
pub fn predict(
    cpu: &CpuEncoder,
    adapter: &Adapter,
    examples: &[Example],
) -> Result<Vec<Vec<f32>>, TrainError> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(64) {
        let seqs: Vec<&[u32]> = chunk.iter().map(|e| e.ids.as_slice()).collect();
        let choice = vec![Some(adapter); seqs.len()];
        let packed = cpu.forward_adapted(&seqs, &choice)?;
        for logits in cpu.classify(&packed, &choice)? {
            let logits = logits
                .ok_or_else(|| TrainError::Invalid("the adapter lost its head".to_owned()))?;
            out.push(crate::model::pooling::softmax(&logits));
        }
    }
    Ok(out)
}

/// Trains a LoRA adapter with a `labels`-way head on `train`, selecting the epoch by macro-F1 on `val`.
/// Starts from `warm` when given. `cancel` is checked between steps.
#[allow(clippy::too_many_arguments)]
pub fn train_lora(
    bert: &Bert,
    cpu: &CpuEncoder,
    labels: usize,
    train: &[Example],
    val: &[Example],
    config: &TrainConfig,
    warm: Option<&Adapter>,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<TrainReport, TrainError> {
    config.validate()?;
    if train.is_empty() || val.is_empty() {
        return Err(TrainError::Invalid(
            "training needs examples in both the train and validation splits".into(),
        ));
    }
    flush_denormals();
    let started = Instant::now();
    let device = Device::Cpu;
    let lora = match warm {
        Some(a) => LoraTrainable::from_adapter(a, &device)?,
        None => LoraTrainable::new(
            &bert.config,
            &config.targets,
            config.rank,
            config.alpha,
            labels,
            config.seed,
            &device,
        )?,
    };
    let params = ParamsAdamW {
        lr: config.learning_rate,
        weight_decay: config.weight_decay,
        ..ParamsAdamW::default()
    };
    let mut optimizer = AdamW::new(lora.vars(), params)?;
    let micro_batches = train.len().div_ceil(config.batch_size);
    let steps_per_epoch = micro_batches.div_ceil(config.grad_accumulation);
    let total_steps = steps_per_epoch * config.epochs;
    let warmup = ((total_steps as f64) * config.warmup_ratio).round() as usize;
    let schedule = |step: usize| -> f64 {
        if step < warmup {
            config.learning_rate * (step + 1) as f64 / warmup as f64
        } else {
            let left =
                total_steps.saturating_sub(step) as f64 / (total_steps - warmup).max(1) as f64;
            config.learning_rate * left.max(0.0)
        }
    };
    let val_truth: Vec<usize> = val.iter().map(|e| e.label).collect();
    let mut rng = Rng::new(config.seed ^ 0x5EED);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let (mut step, mut history) = (0, Vec::new());
    let mut best: Option<(f64, usize, Adapter, Evaluation)> = None;
    let mut since_best = 0;
    let vars = lora.vars();
    for epoch in 1..=config.epochs {
        rng.shuffle(&mut order);
        let (mut loss_sum, mut loss_count) = (0.0, 0usize);
        for group in order.chunks(config.batch_size * config.grad_accumulation) {
            if cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let mut accumulated: Option<GradStore> = None;
            let micro: Vec<&[usize]> = group.chunks(config.batch_size).collect();
            for indices in &micro {
                let batch: Vec<&Example> = indices.iter().map(|&i| &train[i]).collect();
                let (ids, mask, targets) = pad(&batch, bert.config.pad_token_id, &device)?;
                let logits = lora.logits(bert, &ids, &mask)?;
                let loss = cross_entropy(&logits, &targets, config.label_smoothing)?;
                loss_sum += loss.to_scalar::<f32>()? as f64;
                loss_count += 1;
                let grads = (loss / micro.len() as f64)?.backward()?;
                accumulated = Some(match accumulated {
                    None => grads,
                    Some(mut acc) => {
                        for v in &vars {
                            if let (Some(a), Some(g)) =
                                (acc.get(v.as_tensor()), grads.get(v.as_tensor()))
                            {
                                let sum = (a + g)?;
                                acc.insert(v.as_tensor(), sum);
                            }
                        }
                        acc
                    }
                });
            }
            optimizer.set_learning_rate(schedule(step));
            if let Some(grads) = accumulated {
                optimizer.step(&grads)?;
            }
            step += 1;
            progress(&Progress {
                step,
                total_steps,
                epoch,
                train_loss: loss_sum / loss_count.max(1) as f64,
                val: history.last().map(|h: &EpochReport| h.val.clone()),
            });
        }
        let adapter = lora.to_adapter(bert.config.num_hidden_layers)?;
        let evaluation = evaluate(&predict(cpu, &adapter, val)?, &val_truth, labels);
        let train_loss = loss_sum / loss_count.max(1) as f64;
        tracing::info!(
            epoch,
            train_loss,
            val_macro_f1 = evaluation.macro_f1,
            val_accuracy = evaluation.accuracy,
            "epoch done"
        );
        history.push(EpochReport {
            epoch,
            train_loss,
            val: evaluation.clone(),
        });
        progress(&Progress {
            step,
            total_steps,
            epoch,
            train_loss,
            val: Some(evaluation.clone()),
        });
        // Ties go to the later epoch: the same validation score after more training.
        if best.as_ref().is_none_or(|b| evaluation.macro_f1 >= b.0) {
            best = Some((evaluation.macro_f1, epoch, adapter, evaluation));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= config.patience {
                break;
            }
        }
    }
    let (_, best_epoch, adapter, val) =
        best.ok_or_else(|| TrainError::Invalid("no epoch ran".to_owned()))?;
    Ok(TrainReport {
        trainable_params: adapter.parameter_count(),
        adapter,
        best_epoch,
        val,
        history,
        steps: step,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}
