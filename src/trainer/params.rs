//! A job's hyperparameters (`TrainConfig`): what trains, the schedule, the loss, the data, the number
//! format, with their defaults and the checks that refuse a bad value before a job is queued.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::data::Example;
use super::train::TrainError;
use crate::model::adapter::{Pooling, Target};

/// What trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Low-rank factors on the chosen linears plus the head; the result is a PEFT adapter.
    #[default]
    Lora,
    /// Every weight plus the head; the result is a whole checkpoint (the comparison).
    Full,
}

/// How the learning rate falls from its peak after the warmup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Straight down to 0 at the last step.
    #[default]
    Linear,
    /// Half a cosine wave down to 0 at the last step.
    Cosine,
    /// Held at the peak to the end.
    Constant,
}

impl LrSchedule {
    /// The share of the peak rate at `progress` (0 just after the warmup, 1 at the end).
    pub fn share(self, progress: f64) -> f64 {
        let progress = progress.clamp(0.0, 1.0);
        match self {
            Self::Linear => 1.0 - progress,
            Self::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Self::Constant => 1.0,
        }
    }
}

/// The number format of the training passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 where training runs on a GPU; f32 on the CPU, which has no fast bf16 arithmetic.
    #[default]
    Auto,
    /// f32 throughout.
    F32,
    /// bf16 autocast: the encoder's weights and activations in bf16 for the matrix products; LayerNorm,
    /// softmax, the LoRA factors, the head, the loss and the optimizer (its f32 master weights) in f32.
    Bf16,
}

impl Precision {
    /// The encoder's compute format on `device`. `Auto` takes bf16 only on a GPU that multiplies bf16
    /// matrices (a probe: older GPUs lack bf16 kernels), f32 otherwise.
    pub fn dtype(self, device: &Device) -> DType {
        match self {
            Precision::Auto if device.is_cuda() && multiplies_bf16(device) => DType::BF16,
            Precision::Auto | Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// Whether a small bf16 matrix product runs on `device`.
fn multiplies_bf16(device: &Device) -> bool {
    Tensor::ones((2, 2), DType::BF16, device)
        .and_then(|t| t.matmul(&t))
        .and_then(|p| p.to_dtype(DType::F32)?.to_vec2::<f32>())
        .is_ok()
}

/// How examples of each label weigh in the loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ClassWeights {
    /// `"none"` (all 1) or `"balanced"` (`n / (labels · n_label)` from the training split, as
    /// scikit-learn's `class_weight="balanced"`).
    Preset(WeightPreset),
    /// One weight per label, in the task's label order.
    Explicit(Vec<f64>),
}

/// The named class-weight schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WeightPreset {
    /// Every label weighs 1.
    None,
    /// Rare labels weigh more, inversely to their frequency.
    Balanced,
}

impl Default for ClassWeights {
    fn default() -> Self {
        ClassWeights::Preset(WeightPreset::None)
    }
}

impl ClassWeights {
    /// The per-label weights for a training split of `train` examples, or `None` when all are 1.
    pub fn resolve(
        &self,
        train: &[Example],
        labels: usize,
    ) -> Result<Option<Vec<f32>>, TrainError> {
        match self {
            ClassWeights::Preset(WeightPreset::None) => Ok(None),
            ClassWeights::Preset(WeightPreset::Balanced) => {
                let mut counts = vec![0usize; labels];
                for e in train {
                    counts[e.label] += 1;
                }
                Ok(Some(
                    counts
                        .iter()
                        .map(|&c| train.len() as f32 / (labels * c.max(1)) as f32)
                        .collect(),
                ))
            }
            ClassWeights::Explicit(w) => {
                self.check_labels(labels)?;
                Ok(Some(w.iter().map(|&x| x as f32).collect()))
            }
        }
    }

    /// Refuses explicit weights that are not one per label (their range is checked by
    /// [`TrainConfig::validate`]).
    pub fn check_labels(&self, labels: usize) -> Result<(), TrainError> {
        match self {
            ClassWeights::Explicit(w) if w.len() != labels => Err(TrainError::Invalid(format!(
                "class_weights has {} entries but the task has {labels} labels",
                w.len()
            ))),
            _ => Ok(()),
        }
    }
}

/// Hyperparameters of a job; every field has the project's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// LoRA or full fine-tuning.
    pub method: Method,
    /// LoRA rank.
    #[schema(minimum = 1, maximum = 256)]
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    #[schema(exclusive_minimum = 0.0, maximum = 4096.0)]
    pub alpha: f64,
    /// Linears to adapt.
    #[schema(min_items = 1)]
    pub targets: Vec<Target>,
    /// LoRA dropout: the share of each factor input's values zeroed (the rest scaled up to keep the
    /// expectation) while training, as PEFT's `lora_dropout`; the base path and serving never drop.
    #[schema(minimum = 0.0, exclusive_maximum = 1.0)]
    pub lora_dropout: f64,
    /// Peak learning rate; unset means the method's default (LoRA 4e-3, full 5e-5: LoRA wants ~10–100× full
    /// fine-tuning's, see docs/TRAINING.md).
    #[schema(exclusive_minimum = 0.0, exclusive_maximum = 1.0)]
    pub learning_rate: Option<f64>,
    /// Peak learning rate of the classifier (its weight and bias: the part a fresh job initialises at
    /// random), on the same warmup and decay; unset means `learning_rate`'s. The rest (factors, a trained
    /// pooler, the encoder) keeps `learning_rate`.
    #[schema(exclusive_minimum = 0.0, exclusive_maximum = 1.0)]
    pub head_learning_rate: Option<f64>,
    /// Passes over the training split; unset means the method's default (LoRA 3, full 5: see
    /// docs/TRAINING.md for the study behind them).
    #[schema(minimum = 1, maximum = 100)]
    pub epochs: Option<usize>,
    /// Examples per micro-batch.
    #[schema(minimum = 1, maximum = 512)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[schema(minimum = 1, maximum = 64)]
    pub grad_accumulation: usize,
    /// Fraction of steps spent warming the learning rate up linearly; it then follows `lr_schedule`.
    #[schema(minimum = 0.0, exclusive_maximum = 1.0)]
    pub warmup_ratio: f64,
    /// How the rate falls after the warmup: `linear` (to 0 at the end), `cosine` or `constant`.
    pub lr_schedule: LrSchedule,
    /// AdamW weight decay.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub weight_decay: f64,
    /// Bound on the global L2 norm of each step's gradient (all trainable values together), as PyTorch's
    /// `clip_grad_norm_` and Hugging Face's Trainer apply it; a longer gradient is scaled down to it. 0 turns
    /// clipping off.
    #[schema(minimum = 0.0, maximum = 1000.0)]
    pub max_grad_norm: f64,
    /// How many times a diverging run is rolled back to its best stretch of training and goes on at half
    /// the learning rate (see `trainer::guard`); 0 turns the guard off.
    #[schema(minimum = 0, maximum = 10)]
    pub divergence_rollbacks: usize,
    /// Label smoothing of the cross-entropy.
    #[schema(minimum = 0.0, exclusive_maximum = 1.0)]
    pub label_smoothing: f64,
    /// Loss weight per label, against imbalance.
    pub class_weights: ClassWeights,
    /// Tokens per example, special tokens included.
    #[schema(minimum = 8, maximum = 512)]
    pub max_length: usize,
    /// Epochs without a better validation macro-F1 before stopping.
    #[schema(minimum = 1, maximum = 100)]
    pub patience: usize,
    /// Fraction of each label held out for validation.
    #[schema(minimum = 0.05, maximum = 0.5)]
    pub val_fraction: f64,
    /// The small-data guard: when the validation split would hold fewer examples than this of some label,
    /// the job skips validation, trains on every example for `epochs` and keeps the last epoch, and says so
    /// (macro-F1 on a handful of rows picks an epoch by noise). 0: always validate.
    #[schema(minimum = 0, maximum = 1000)]
    pub min_val_per_label: usize,
    /// Seed of initialisation, split and shuffles.
    pub seed: u64,
    /// Start from the task's stable generation when it is a LoRA adapter whose head pools as this job's does
    /// (its rank and targets then replace `rank` and `targets`); otherwise from fresh factors. LoRA only.
    pub warm_start: bool,
    /// When warm-starting, train on the feedback that arrived since the parent generation's data snapshot
    /// plus this many older examples per new one, sampled evenly (replay, against forgetting); `null` trains
    /// on all of the task's feedback.
    #[schema(minimum = 0.0, maximum = 100.0)]
    pub replay: Option<f64>,
    /// The number format of the forward and backward passes: `auto` (bf16 on a GPU, f32 on the CPU), `f32`
    /// or `bf16` (autocast: see docs/TRAINING.md).
    pub precision: Precision,
    /// How a LoRA head pools: `cls` (`BertForSequenceClassification`'s `[CLS]` through the pooler; a base
    /// without one gets a pooler of the head's own) or `mean` (the token mean, as the sentence embedders
    /// pool; Flywheel serves it, PEFT's sequence classifier cannot express it). Unset: a warm start keeps
    /// the parent's, a fresh LoRA head pools `mean` (see docs/TRAINING.md for why). Full fine-tuning always
    /// pools `[CLS]`.
    pub pooling: Option<Pooling>,
    /// Whether a `cls` LoRA head trains a copy of the base's pooler (saved with the adapter as PEFT's
    /// `modules_to_save` saves it) instead of running the base's frozen one. A base without a pooler always
    /// gets a trained pooler of the head's own; full fine-tuning trains the pooler anyway.
    pub train_pooler: bool,
    /// Partial fine-tuning: the embeddings and this many bottom encoder layers stay as the base has them,
    /// the rest trains (0: all trains). Full fine-tuning only; LoRA keeps the whole base frozen already.
    #[schema(minimum = 0, maximum = 64)]
    pub freeze_layers: usize,
    /// Layer-wise learning-rate decay: the head and pooler train at the learning rate, the top encoder layer
    /// at this share of it, each layer below at this share of the one above, the embeddings last (1: one
    /// rate for all). Full fine-tuning only.
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub layer_lr_decay: f64,
    /// On a warm start, how hard each step pulls every trainable value back towards the parent
    /// generation's: a share `learning rate × parent_pull` of the way (an L2 pull, decoupled like weight
    /// decay), against forgetting, instead of or beside `replay` (0: off). LoRA only.
    #[schema(minimum = 0.0, maximum = 1000.0)]
    pub parent_pull: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: Method::Lora,
            rank: 8,
            alpha: 16.0,
            targets: vec![Target::Query, Target::Value],
            lora_dropout: 0.1,
            learning_rate: None,
            head_learning_rate: None,
            epochs: None,
            batch_size: 16,
            grad_accumulation: 1,
            warmup_ratio: 0.1,
            lr_schedule: LrSchedule::Linear,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            divergence_rollbacks: 3,
            label_smoothing: 0.1,
            class_weights: ClassWeights::default(),
            max_length: 128,
            patience: 3,
            val_fraction: 0.15,
            min_val_per_label: 5,
            seed: 0,
            warm_start: true,
            replay: Some(2.0),
            precision: Precision::Auto,
            pooling: None,
            train_pooler: false,
            freeze_layers: 0,
            layer_lr_decay: 1.0,
            parent_pull: 0.0,
        }
    }
}

impl TrainConfig {
    /// The hyperparameters a TOML table sets (the rest at their defaults), checked.
    pub fn from_table(table: &toml::Table) -> Result<Self, TrainError> {
        let config: Self = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what depends on the server rather than on the job alone: a LoRA rank the registry would
    /// refuse to publish (`[adapters] max_rank`), and more frozen layers than the model has (`layers`, when
    /// known). Checked when a job is submitted, so that it is refused then rather than failing at its end.
    pub fn check_fits(&self, max_rank: usize, layers: Option<usize>) -> Result<(), TrainError> {
        if self.method == Method::Lora && self.rank > max_rank {
            return Err(TrainError::Invalid(format!(
                "rank {} is over this server's adapter limit, [adapters] max_rank = {max_rank}",
                self.rank
            )));
        }
        match layers {
            Some(layers) if self.freeze_layers > layers => Err(TrainError::Invalid(format!(
                "freeze_layers {} is more than the model's {layers} layers",
                self.freeze_layers
            ))),
            _ => Ok(()),
        }
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: &str| Err(TrainError::Invalid(m.to_owned()));
        if self.rank == 0 || self.rank > 256 {
            return bad("rank must be 1 to 256");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0 && self.alpha <= 4096.0) {
            return bad("alpha must be in (0, 4096]");
        }
        if self.targets.is_empty() {
            return bad("targets must name at least one linear");
        }
        let mut named = std::collections::BTreeSet::new();
        if !self.targets.iter().all(|t| named.insert(*t)) {
            return bad("targets must not name a linear twice");
        }
        if self.method == Method::Full && self.pooling == Some(Pooling::Mean) {
            return bad("full fine-tuning trains a BertForSequenceClassification, which pools [CLS]: pooling must be cls");
        }
        if !(self.lr() > 0.0 && self.lr() < 1.0) {
            return bad("learning_rate must be in (0, 1)");
        }
        if self
            .head_learning_rate
            .is_some_and(|lr| !(lr.is_finite() && lr > 0.0 && lr < 1.0))
        {
            return bad("head_learning_rate must be in (0, 1)");
        }
        if self.epochs() == 0
            || self.epochs() > 100
            || self.batch_size == 0
            || self.batch_size > 512
        {
            return bad("epochs must be 1 to 100 and batch_size 1 to 512");
        }
        if self.patience == 0 || self.patience > 100 {
            return bad("patience must be 1 to 100 epochs");
        }
        if self.grad_accumulation == 0 || self.grad_accumulation > 64 {
            return bad("grad_accumulation must be 1 to 64");
        }
        if !(0.0..1.0).contains(&self.warmup_ratio)
            || !(0.0..1.0).contains(&self.label_smoothing)
            || !(0.0..1.0).contains(&self.lora_dropout)
        {
            return bad("warmup_ratio, label_smoothing and lora_dropout must be in [0, 1)");
        }
        if !(0.0..=1.0).contains(&self.weight_decay) || !(0.05..=0.5).contains(&self.val_fraction) {
            return bad("weight_decay must be in [0, 1] and val_fraction in [0.05, 0.5]");
        }
        if !(self.max_grad_norm.is_finite() && (0.0..=1000.0).contains(&self.max_grad_norm)) {
            return bad("max_grad_norm must be 0 to 1000");
        }
        if self.divergence_rollbacks > 10 {
            return bad("divergence_rollbacks must be 0 to 10");
        }
        if self.min_val_per_label > 1000 {
            return bad("min_val_per_label must be 0 to 1000");
        }
        if !(8..=512).contains(&self.max_length) {
            return bad("max_length must be 8 to 512");
        }
        if !(self.layer_lr_decay > 0.0 && self.layer_lr_decay <= 1.0) || self.freeze_layers > 64 {
            return bad("layer_lr_decay must be in (0, 1] and freeze_layers 0 to 64");
        }
        if !(self.parent_pull.is_finite() && (0.0..=1000.0).contains(&self.parent_pull)) {
            return bad("parent_pull must be 0 to 1000");
        }
        if self.method == Method::Full && self.parent_pull > 0.0 {
            return bad("parent_pull applies to LoRA warm starts (full fine-tuning has no parent)");
        }
        if self.method == Method::Lora && (self.freeze_layers > 0 || self.layer_lr_decay != 1.0) {
            return bad(
                "freeze_layers and layer_lr_decay apply to full fine-tuning (LoRA keeps the base frozen)",
            );
        }
        if self
            .replay
            .is_some_and(|r| !(r.is_finite() && (0.0..=100.0).contains(&r)))
        {
            return bad("replay must be 0 to 100 older examples per new one");
        }
        if let ClassWeights::Explicit(w) = &self.class_weights {
            if w.iter().any(|x| !(x.is_finite() && *x > 0.0 && *x <= 1e3)) {
                return bad("class_weights must be positive and at most 1000");
            }
        }
        Ok(())
    }

    /// How a fresh head pools: the override, or the method's default (LoRA `mean`, full `cls`).
    pub fn fresh_pooling(&self) -> Pooling {
        self.pooling.unwrap_or(match self.method {
            Method::Lora => Pooling::Mean,
            Method::Full => Pooling::Cls,
        })
    }

    /// The peak learning rate: the override, or the method's default.
    pub fn lr(&self) -> f64 {
        self.learning_rate.unwrap_or(match self.method {
            Method::Lora => 4e-3,
            Method::Full => 5e-5,
        })
    }

    /// The classifier's learning rate as a multiple of [`Self::lr`] (1 when it has none of its own).
    pub fn head_lr_scale(&self) -> f64 {
        self.head_learning_rate.map_or(1.0, |h| h / self.lr())
    }

    /// Passes over the training split: the override, or the method's default.
    pub fn epochs(&self) -> usize {
        self.epochs.unwrap_or(match self.method {
            Method::Lora => 3,
            Method::Full => 5,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_must_fit_the_server_it_is_submitted_to() {
        let lora = |rank| TrainConfig {
            rank,
            ..TrainConfig::default()
        };
        assert!(lora(64).check_fits(64, Some(6)).is_ok());
        assert!(lora(65).validate().is_ok(), "in range for any server");
        assert!(
            matches!(lora(65).check_fits(64, Some(6)), Err(TrainError::Invalid(m)) if m.contains("max_rank"))
        );
        let full = |freeze_layers| TrainConfig {
            method: Method::Full,
            rank: 128,
            freeze_layers,
            ..TrainConfig::default()
        };
        assert!(
            full(6).check_fits(64, Some(6)).is_ok(),
            "full fine-tuning has no rank"
        );
        assert!(full(7).check_fits(64, Some(6)).is_err());
        assert!(
            full(7).check_fits(64, None).is_ok(),
            "the layers are not known yet"
        );
        let twice = TrainConfig {
            targets: vec![Target::Query, Target::Value, Target::Query],
            ..TrainConfig::default()
        };
        assert!(twice.validate().is_err());
    }

    #[test]
    fn patience_is_at_least_one_epoch() {
        let with = |patience| TrainConfig {
            patience,
            ..TrainConfig::default()
        };
        assert!(
            matches!(with(0).validate(), Err(TrainError::Invalid(m)) if m.contains("patience"))
        );
        assert!(with(1).validate().is_ok() && with(100).validate().is_ok());
        assert!(with(101).validate().is_err());
    }
}
