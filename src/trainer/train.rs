//! The training loop, for LoRA and full fine-tuning alike: AdamW with warmup and a linear (or cosine, or
//! no) decay, gradient accumulation, label smoothing, evaluation on the validation split after every epoch,
//! early stopping on macro-F1 with patience, and the best epoch's adapter as the result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use serde::Serialize;

use super::data::{pad, Example, Rng};
use super::eval::{evaluate, Evaluation};
use super::full::FullTrainable;
use super::guard::{constant_loss, DivergenceGuard};
use super::lora::{cross_entropy, LoraTrainable};
use crate::heap::TrainingHeap;
use crate::model::adapter::{Adapter, Pooling};
use crate::model::{Bert, CpuEncoder, ModelError};

pub use super::params::{ClassWeights, LrSchedule, Method, Precision, TrainConfig, WeightPreset};

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The job's inputs are unusable.
    #[error("{0}")]
    Invalid(String),
    /// The job was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The job queue is full.
    #[error("{0}")]
    QueueFull(String),
    /// What the job would publish has no room (the adapter limit is reached).
    #[error("{0}")]
    Conflict(String),
    /// The trainer is stopping and takes no new jobs.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The shared job queue could not be read or written.
    #[error("job storage: {0}")]
    Storage(String),
    /// This process does not train (`[trainer] enabled = false`).
    #[error("this replica does not train ([trainer] enabled = false); send the job to a training replica")]
    Disabled,
    /// The tensor library failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The job panicked; the trainer caught it and goes on with the next job.
    #[error("{0}")]
    Panicked(String),
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
    /// Mean global L2 norm of the gradient before clipping, over the epoch's steps so far; `None` with
    /// clipping off (`max_grad_norm` 0), which skips measuring it.
    pub grad_norm: Option<f64>,
    /// Training examples per second so far.
    pub examples_per_second: f64,
}

/// One epoch's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Validation scores; `None` in a run without validation.
    pub val: Option<Evaluation>,
    /// Mean global L2 norm of the gradient before clipping; `None` with clipping off.
    pub grad_norm: Option<f64>,
    /// Optimizer steps whose gradient was longer than `max_grad_norm` and was scaled down.
    pub clipped_steps: usize,
    /// Times the run diverged in this epoch and went back to its best stretch at half the learning rate.
    pub rollbacks: usize,
    /// Optimizer steps skipped because their loss or gradient was not finite (NaN or infinite), as
    /// PyTorch's `GradScaler` skips them: the weights stay as they were.
    pub skipped_steps: usize,
}

/// What a finished run produced: `R` is the best epoch's adapter (LoRA) or weights (full).
#[derive(Debug, Clone)]
pub struct TrainReport<R> {
    /// The best epoch's result (the last epoch's in a run without validation).
    pub result: R,
    /// The epoch it came from.
    pub best_epoch: usize,
    /// Its validation scores; `None` in a run without validation.
    pub val: Option<Evaluation>,
    /// Every epoch.
    pub history: Vec<EpochReport>,
    /// Trainable values.
    pub trainable_params: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Wall time.
    pub wall_seconds: f64,
}

impl<R> TrainReport<R> {
    /// The result, and the run's figures without it.
    pub fn split(self) -> (R, TrainReport<()>) {
        let TrainReport {
            result,
            best_epoch,
            val,
            history,
            trainable_params,
            steps,
            wall_seconds,
        } = self;
        (
            result,
            TrainReport {
                result: (),
                best_epoch,
                val,
                history,
                trainable_params,
                steps,
                wall_seconds,
            },
        )
    }
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

/// The learning rate of step `step` (from 0) of `total_steps`: a linear warmup over `warmup_ratio` of the
/// steps to the peak, then `lr_schedule` down from it.
fn learning_rate_at(config: &TrainConfig, step: usize, total_steps: usize) -> f64 {
    let warmup = ((total_steps as f64) * config.warmup_ratio).round() as usize;
    let peak = config.lr();
    if step < warmup {
        peak * (step + 1) as f64 / warmup as f64
    } else {
        let progress = (step - warmup) as f64 / (total_steps - warmup).max(1) as f64;
        peak * config.lr_schedule.share(progress)
    }
}

/// What the training loop needs of the thing it trains.
trait Trainable {
    /// The state kept of the best epoch.
    type Snapshot;
    /// Where the forward and backward passes run.
    fn device(&self) -> Device;
    fn vars(&self) -> Vec<Var>;
    /// The classifier's weight and bias (among `vars`).
    fn classifier(&self) -> [&Var; 2];
    /// Each variable's share of the learning rate under layer-wise decay `decay`, in `vars`' order.
    fn lr_scales(&self, _decay: f64) -> Vec<f64> {
        vec![1.0; self.vars().len()]
    }
    /// Whether the variables start from a parent generation's values (a warm start).
    fn warm_started(&self) -> bool {
        false
    }
    fn logits(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, TrainError>;
    fn predict(&self, examples: &[Example]) -> Result<Vec<Vec<f32>>, TrainError>;
    fn snapshot(&self) -> Result<Self::Snapshot, TrainError>;
}

struct LoraRun<'a> {
    lora: LoraTrainable,
    bert: &'a Bert,
    cpu: &'a CpuEncoder,
    warm: bool,
}

impl Trainable for LoraRun<'_> {
    type Snapshot = Adapter;

    fn device(&self) -> Device {
        self.bert.device().clone()
    }

    fn warm_started(&self) -> bool {
        self.warm
    }

    fn vars(&self) -> Vec<Var> {
        self.lora.vars()
    }

    fn classifier(&self) -> [&Var; 2] {
        self.lora.classifier()
    }

    fn logits(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, TrainError> {
        Ok(self.lora.logits(self.bert, ids, mask)?)
    }

    fn predict(&self, examples: &[Example]) -> Result<Vec<Vec<f32>>, TrainError> {
        predict(self.cpu, &self.snapshot()?, examples)
    }

    fn snapshot(&self) -> Result<Adapter, TrainError> {
        Ok(self.lora.to_adapter(self.bert.config.num_hidden_layers)?)
    }
}

impl Trainable for FullTrainable {
    type Snapshot = HashMap<String, Tensor>;

    fn device(&self) -> Device {
        FullTrainable::device(self).clone()
    }

    fn vars(&self) -> Vec<Var> {
        FullTrainable::vars(self)
    }

    fn classifier(&self) -> [&Var; 2] {
        FullTrainable::classifier(self)
    }

    fn lr_scales(&self, decay: f64) -> Vec<f64> {
        FullTrainable::lr_scales(self, decay)
    }

    fn logits(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, TrainError> {
        Ok(FullTrainable::logits(self, ids, mask)?)
    }

    fn predict(&self, examples: &[Example]) -> Result<Vec<Vec<f32>>, TrainError> {
        Ok(FullTrainable::predict(self, examples)?)
    }

    fn snapshot(&self) -> Result<Self::Snapshot, TrainError> {
        Ok(FullTrainable::snapshot(self)?)
    }
}

/// Trains a LoRA adapter with a `labels`-way head on `train`, selecting the epoch by macro-F1 on `val` (an
/// empty `val`, the small-data guard's case, runs every epoch and keeps the last).
/// Starts from `warm` when given. `cancel` is checked before each micro-batch.
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
) -> Result<TrainReport<Adapter>, TrainError> {
    let device = bert.device().clone();
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
        )
        .and_then(|fresh| {
            match (config.fresh_pooling(), &bert.pooler) {
                (Pooling::Mean, _) => Ok(fresh.with_mean_pooling()),
                // A checkpoint without a pooler (multilingual-e5-small's): a [CLS] head brings its own.
                (Pooling::Cls, None) => {
                    fresh.with_own_pooler(bert.config.hidden_size, config.seed, &device)
                }
                (Pooling::Cls, Some(base)) if config.train_pooler => fresh.with_pooler_from(base),
                (Pooling::Cls, Some(_)) => Ok(fresh),
            }
        })?,
    }
    .with_dropout(config.lora_dropout, config.seed);
    let compute = bert.to_dtype(config.precision.dtype(&device))?;
    fit(
        &LoraRun {
            lora,
            bert: &compute,
            cpu,
            warm: warm.is_some(),
        },
        bert.config.pad_token_id,
        labels,
        train,
        val,
        config,
        progress,
        cancel,
    )
}

/// Fine-tunes every weight of `bert` (a copy; `bert` itself is untouched) with a fresh `labels`-way head;
/// the result is the best epoch's weights under `BertForSequenceClassification` names (the last epoch's
/// when `val` is empty).
#[allow(clippy::too_many_arguments)]
pub fn train_full(
    bert: &Bert,
    labels: usize,
    train: &[Example],
    val: &[Example],
    config: &TrainConfig,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<TrainReport<HashMap<String, Tensor>>, TrainError> {
    let full = FullTrainable::partial(bert, labels, config.seed, config.freeze_layers)?
        .with_compute(config.precision.dtype(bert.device()));
    fit(
        &full,
        bert.config.pad_token_id,
        labels,
        train,
        val,
        config,
        progress,
        cancel,
    )
}

#[allow(clippy::too_many_arguments)]
fn fit<T: Trainable>(
    trainable: &T,
    pad_id: u32,
    labels: usize,
    train: &[Example],
    val: &[Example],
    config: &TrainConfig,
    progress: &mut dyn FnMut(&Progress),
    cancel: &AtomicBool,
) -> Result<TrainReport<T::Snapshot>, TrainError> {
    config.validate()?;
    if train.is_empty() {
        return Err(TrainError::Invalid(
            "training needs examples in the train split".into(),
        ));
    }
    flush_denormals();
    let _heap = TrainingHeap::enter();
    let started = Instant::now();
    let device = trainable.device();
    let weights = config.class_weights.resolve(train, labels)?;
    let class_weights = weights
        .clone()
        .map(|w| Tensor::from_vec(w, labels, &device))
        .transpose()?;
    let vars = trainable.vars();
    let trainable_params = vars.iter().map(|v| v.elem_count()).sum();
    let params = ParamsAdamW {
        lr: config.lr(),
        weight_decay: config.weight_decay,
        ..ParamsAdamW::default()
    };
    let classifier = trainable.classifier().map(|v| v.as_tensor().id());
    let scales: Vec<f64> = vars
        .iter()
        .zip(trainable.lr_scales(config.layer_lr_decay))
        .map(|(v, scale)| {
            if classifier.contains(&v.as_tensor().id()) {
                scale * config.head_lr_scale()
            } else {
                scale
            }
        })
        .collect();
    let mut optimizer = super::optim::FusedAdamW::with_scales(vars.clone(), &scales, params)?;
    if config.parent_pull > 0.0 && trainable.warm_started() {
        optimizer.anchor_here(config.parent_pull)?;
    }
    let micro_batches = train.len().div_ceil(config.batch_size);
    let steps_per_epoch = micro_batches.div_ceil(config.grad_accumulation);
    let total_steps = steps_per_epoch * config.epochs();
    let schedule = |step: usize| learning_rate_at(config, step, total_steps);
    // Windows of a tenth of an epoch: long enough that batch-to-batch noise does not look like a divergence.
    let mut guard = DivergenceGuard::new(
        (steps_per_epoch / 10).clamp(5, 50),
        constant_loss(
            train.iter().map(|e| e.label),
            labels,
            config.label_smoothing,
            weights.as_deref(),
        ),
        config.divergence_rollbacks,
    );
    // Halved at each rollback.
    let mut lr_factor = 1.0;
    let val_truth: Vec<usize> = val.iter().map(|e| e.label).collect();
    let mut rng = Rng::new(config.seed ^ 0x5EED);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let (mut step, mut history) = (0, Vec::new());
    let mut best: Option<(f64, usize, T::Snapshot, Option<Evaluation>)> = None;
    let mut since_best = 0;
    let mut examples_seen = 0usize;
    for epoch in 1..=config.epochs() {
        rng.shuffle(&mut order);
        // The epoch's loss is the (weighted) mean over its examples, as one pass over them all would give:
        // a short last micro-batch counts for its examples only. Non-finite losses are left out (their
        // steps are skipped).
        let (mut loss_sum, mut loss_weight) = (0.0, 0.0);
        let mut norms = NormTally::default();
        let (mut rollbacks, mut skipped, mut steps_this_epoch) = (0, 0, 0);
        for group in order.chunks(config.batch_size * config.grad_accumulation) {
            let mut accumulated: Option<GradStore> = None;
            let micro: Vec<&[usize]> = group.chunks(config.batch_size).collect();
            // Each micro-batch's loss is a (weighted) mean over its own examples; scaled by its share of
            // the step's examples (their weight, with class weights), the step's gradient is the one a
            // single batch of all of them would give, a short last micro-batch included.
            let weight_of = |indices: &[usize]| -> f64 {
                indices
                    .iter()
                    .map(|&i| {
                        weights
                            .as_ref()
                            .map_or(1.0, |w| f64::from(w[train[i].label]))
                    })
                    .sum()
            };
            let group_weight = weight_of(group);
            let mut step_loss = 0.0;
            for indices in &micro {
                // Checked per micro-batch: with gradient accumulation a step is several forward and
                // backward passes, too long for a shutdown's deadline.
                if cancel.load(Ordering::Relaxed) {
                    return Err(TrainError::Cancelled);
                }
                let weight = weight_of(indices);
                let share = weight / group_weight;
                let batch: Vec<&Example> = indices.iter().map(|&i| &train[i]).collect();
                let (ids, mask, targets) = pad(&batch, pad_id, &device)?;
                let logits = trainable.logits(&ids, &mask)?;
                let loss = cross_entropy(
                    &logits,
                    &targets,
                    config.label_smoothing,
                    class_weights.as_ref(),
                )?;
                let value = loss.to_scalar::<f32>()? as f64;
                if value.is_finite() {
                    loss_sum += value * weight;
                    loss_weight += weight;
                }
                step_loss += value * share;
                examples_seen += batch.len();
                let grads = (loss * share)?.backward()?;
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
            crate::pressure::yield_point();
            optimizer.set_learning_rate(schedule(step) * lr_factor);
            // A NaN or infinite loss or gradient would turn every weight into NaN in one step, and a NaN
            // adapter predicts the first label for everything: such a step is skipped.
            let mut finite = step_loss.is_finite();
            if let Some(mut grads) = accumulated.filter(|_| finite) {
                // The norm is measured with clipping off (0) too, to find a non-finite gradient; it is
                // reported only with clipping on.
                let norm = super::clip::clip_grad_norm(&mut grads, &vars, config.max_grad_norm)?;
                finite = norm.is_finite();
                if finite && config.max_grad_norm > 0.0 {
                    norms.add(norm, config.max_grad_norm);
                }
                if finite {
                    optimizer.step(&grads)?;
                }
            }
            step += 1;
            steps_this_epoch += 1;
            if !finite {
                skipped += 1;
                tracing::warn!(
                    epoch,
                    step,
                    loss = step_loss,
                    "a step's loss or gradient was not finite: step skipped"
                );
            } else if let Some(d) = guard.observe(step_loss, &vars)? {
                guard.roll_back(&vars)?;
                optimizer.reset()?;
                lr_factor *= 0.5;
                rollbacks += 1;
                tracing::warn!(
                    epoch,
                    step,
                    window_loss = d.loss,
                    best_window_loss = d.best,
                    constant_prediction_loss = d.constant,
                    learning_rate_factor = lr_factor,
                    "training diverged: back to the best stretch of training, at half the learning rate"
                );
            }
            progress(&Progress {
                step,
                total_steps,
                epoch,
                train_loss: loss_sum / loss_weight.max(f64::MIN_POSITIVE),
                val: history.last().and_then(|h: &EpochReport| h.val.clone()),
                grad_norm: norms.mean(),
                examples_per_second: examples_seen as f64 / started.elapsed().as_secs_f64(),
            });
        }
        if skipped == steps_this_epoch {
            return Err(TrainError::Invalid(format!(
                "the loss or its gradient was not finite (NaN or infinite) in every step of epoch {epoch}: \
                 lower learning_rate (it is {}) or check the data",
                config.lr()
            )));
        }
        if !all_finite(&vars)? {
            return Err(TrainError::Invalid(format!(
                "training made the weights non-finite (NaN or infinite) in epoch {epoch}: lower \
                 learning_rate (it is {})",
                config.lr()
            )));
        }
        let train_loss = loss_sum / loss_weight.max(f64::MIN_POSITIVE);
        let evaluation = if val.is_empty() {
            None
        } else {
            Some(evaluate(&trainable.predict(val)?, &val_truth, labels))
        };
        tracing::info!(
            epoch,
            train_loss,
            val_macro_f1 = evaluation.as_ref().map(|e| e.macro_f1),
            val_accuracy = evaluation.as_ref().map(|e| e.accuracy),
            grad_norm = norms.mean(),
            clipped_steps = norms.clipped,
            rollbacks,
            skipped_steps = skipped,
            "epoch done"
        );
        history.push(EpochReport {
            epoch,
            train_loss,
            val: evaluation.clone(),
            grad_norm: norms.mean(),
            clipped_steps: norms.clipped,
            rollbacks,
            skipped_steps: skipped,
        });
        progress(&Progress {
            step,
            total_steps,
            epoch,
            train_loss,
            val: evaluation.clone(),
            grad_norm: norms.mean(),
            examples_per_second: examples_seen as f64 / started.elapsed().as_secs_f64(),
        });
        // Ties go to the later epoch: the same validation score after more training. Without validation
        // the last epoch is kept.
        let keep = match &evaluation {
            Some(e) => best.as_ref().is_none_or(|b| e.macro_f1 >= b.0),
            None => epoch == config.epochs(),
        };
        if keep {
            let score = evaluation.as_ref().map_or(0.0, |e| e.macro_f1);
            best = Some((score, epoch, trainable.snapshot()?, evaluation));
            since_best = 0;
        } else if evaluation.is_some() {
            since_best += 1;
            if since_best >= config.patience {
                break;
            }
        }
    }
    let (_, best_epoch, result, val) =
        best.ok_or_else(|| TrainError::Invalid("no epoch ran".to_owned()))?;
    Ok(TrainReport {
        result,
        trainable_params,
        best_epoch,
        val,
        history,
        steps: step,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Whether every value of `vars` is finite: a sum is NaN or infinite when any of its terms is.
fn all_finite(vars: &[Var]) -> Result<bool, TrainError> {
    for v in vars {
        let sum = v
            .as_tensor()
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        if !sum.is_finite() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One epoch's gradient norms before clipping: their sum, count, and how many exceeded the bound.
#[derive(Default)]
struct NormTally {
    sum: f64,
    count: usize,
    clipped: usize,
}

impl NormTally {
    fn add(&mut self, norm: f64, max_norm: f64) {
        self.sum += norm;
        self.count += 1;
        if norm > max_norm {
            self.clipped += 1;
        }
    }

    fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::{learning_rate_at, LrSchedule, Pooling, TrainConfig};

    #[test]
    fn the_rate_warms_up_then_follows_the_schedule() {
        let at = |lr_schedule, step| {
            let config = TrainConfig {
                learning_rate: Some(1.0e-3),
                warmup_ratio: 0.2,
                lr_schedule,
                ..TrainConfig::default()
            };
            learning_rate_at(&config, step, 11)
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        for schedule in [LrSchedule::Linear, LrSchedule::Cosine, LrSchedule::Constant] {
            assert!(close(at(schedule, 0), 0.5e-3), "warmup: 2 steps of 11");
            assert!(close(at(schedule, 2), 1.0e-3), "the peak after the warmup");
        }
        // Nine steps after the warmup: progress 0, 1/9, … 8/9.
        assert!(close(at(LrSchedule::Linear, 10), 1.0e-3 / 9.0));
        assert!(close(at(LrSchedule::Linear, 6), 1.0e-3 * 5.0 / 9.0));
        let halfway = 1.0e-3 * 0.5 * (1.0 + (std::f64::consts::PI * 4.0 / 9.0).cos());
        assert!(close(at(LrSchedule::Cosine, 6), halfway));
        assert!(at(LrSchedule::Cosine, 10) < at(LrSchedule::Linear, 10));
        assert!(close(at(LrSchedule::Constant, 10), 1.0e-3));
        let table: toml::Table = "lr_schedule = \"cosine\"".parse().expect("valid TOML");
        assert_eq!(
            TrainConfig::from_table(&table).expect("valid").lr_schedule,
            LrSchedule::Cosine
        );
        let bad: toml::Table = "lr_schedule = \"step\"".parse().expect("valid TOML");
        assert!(TrainConfig::from_table(&bad).is_err());
    }

    #[test]
    fn automatic_job_parameters_come_from_a_toml_table_and_are_checked() {
        let table: toml::Table = "epochs = 2\nmax_length = 64\nclass_weights = \"balanced\""
            .parse()
            .expect("valid TOML");
        let config = TrainConfig::from_table(&table).expect("valid parameters");
        assert_eq!((config.epochs(), config.max_length), (2, 64));
        assert_eq!(config.rank, TrainConfig::default().rank);
        let unknown: toml::Table = "epoch = 2".parse().expect("valid TOML");
        assert!(TrainConfig::from_table(&unknown).is_err());
        let out_of_range: toml::Table = "rank = 0".parse().expect("valid TOML");
        assert!(TrainConfig::from_table(&out_of_range).is_err());
        assert_eq!(
            TrainConfig::from_table(&toml::Table::new()).expect("defaults"),
            TrainConfig::default()
        );
    }

    #[test]
    fn partial_fine_tuning_and_layer_wise_decay_are_full_fine_tuning_options() {
        let full: toml::Table = "method = \"full\"\nfreeze_layers = 4\nlayer_lr_decay = 0.8"
            .parse()
            .expect("valid TOML");
        let config = TrainConfig::from_table(&full).expect("valid");
        assert_eq!((config.freeze_layers, config.layer_lr_decay), (4, 0.8));
        for bad in [
            "freeze_layers = 2",
            "layer_lr_decay = 0.9",
            "method = \"full\"\nlayer_lr_decay = 0.0",
            "method = \"full\"\nlayer_lr_decay = 1.5",
        ] {
            let table: toml::Table = bad.parse().expect("valid TOML");
            assert!(TrainConfig::from_table(&table).is_err(), "{bad}");
        }
    }

    #[test]
    fn lora_heads_pool_the_mean_unless_asked_and_full_fine_tuning_refuses_mean() {
        assert_eq!(TrainConfig::default().pooling, None);
        assert_eq!(TrainConfig::default().fresh_pooling(), Pooling::Mean);
        let full = TrainConfig {
            method: super::Method::Full,
            ..TrainConfig::default()
        };
        assert_eq!(full.fresh_pooling(), Pooling::Cls);
        let table: toml::Table = "pooling = \"cls\"".parse().expect("valid TOML");
        assert_eq!(
            TrainConfig::from_table(&table)
                .expect("valid")
                .fresh_pooling(),
            Pooling::Cls
        );
        let full: toml::Table = "pooling = \"mean\"\nmethod = \"full\""
            .parse()
            .expect("valid TOML");
        let err = TrainConfig::from_table(&full).unwrap_err().to_string();
        assert!(err.contains("pools [CLS]"), "{err}");
    }
}
