//! Trainable LoRA factors and classification head on the candle path.
//!
//! Only the factors and the head are `Var`s; the base encoder stays plain frozen tensors. The factors join
//! the forward pass through [`Deltas`], so the trained network is exactly the one the fused serving path
//! runs once exported with [`LoraTrainable::to_adapter`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, IndexOp, Module, Tensor, Var, D};

use crate::model::adapter::{Adapter, Dense, Head, LoraDelta, Pooling, Target};
use crate::model::bert::{Bert, Deltas};
use crate::model::train::lora_linear::{DropoutDraw, LowRank};
use crate::model::{BertConfig, ModelError, Result};

fn uniform(seed: u64, n: usize, bound: f32) -> Vec<f32> {
    crate::rng::Rng::new(seed).uniform(n, bound)
}

fn var(values: Vec<f32>, shape: (usize, usize), device: &Device) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?)
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// LoRA factors per (layer, target) and a classification head, as trainable variables.
pub struct LoraTrainable {
    factors: BTreeMap<(usize, Target), (Var, Var)>,
    classifier_weight: Var,
    classifier_bias: Var,
    /// A pooler (weight, bias) of the head's own, trained, for base models whose checkpoint has none
    /// (multilingual-e5-small's); `None` uses the base model's, frozen.
    pooler: Option<(Var, Var)>,
    /// How the head pools: `[CLS]` through a pooler, or the mean of the tokens.
    pooling: Pooling,
    rank: usize,
    scale: f64,
    dropout: Option<Dropout>,
}

/// Dropout on the factors' input: a fresh seeded mask per call (keep with probability `1 − p`, scaled by
/// `1 / (1 − p)`), so a run is reproducible from its seed.
struct Dropout {
    p: f64,
    seed: u64,
    calls: AtomicU64,
}

impl Dropout {
    /// The next call's mask seed.
    fn draw(&self) -> DropoutDraw {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        // Hashed, not only combined: each mask walks the generator from its seed in steps of one constant,
        // so seeds that differ by a multiple of it (as `seed ^ call × constant` often do) would draw the same
        // masks shifted.
        DropoutDraw {
            p: self.p,
            seed: crate::rng::Rng::new(self.seed ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .next_u64(),
        }
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let draw = self.draw();
        let scale = draw.scale();
        let mask: Vec<f32> = draw
            .mask(x.elem_count())
            .into_iter()
            .map(|m| f32::from(m) * scale)
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu)?.to_device(x.device())?;
        Ok((x * mask.to_dtype(x.dtype())?)?)
    }
}

impl LoraTrainable {
    /// Fresh factors as PEFT initialises them (A uniform in ±1/√in, B zero, so training starts at the base
    /// model) and a fresh head (weights uniform in ±0.02·√3, i.e. std 0.02; bias zero), seeded.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &BertConfig,
        targets: &[Target],
        rank: usize,
        alpha: f64,
        labels: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if rank == 0 || labels < 2 || targets.is_empty() {
            return Err(ModelError::InvalidInput(
                "LoRA needs rank ≥ 1, ≥ 2 labels and ≥ 1 target".to_owned(),
            ));
        }
        let mut factors = BTreeMap::new();
        for layer in 0..config.num_hidden_layers {
            for (k, &target) in targets.iter().enumerate() {
                let (i, o) = target.shape(config);
                let s = seed
                    .wrapping_mul(1000)
                    .wrapping_add((layer * 16 + k) as u64);
                let a = var(
                    uniform(s, rank * i, 1.0 / (i as f32).sqrt()),
                    (rank, i),
                    device,
                )?;
                let b = var(vec![0.0; o * rank], (o, rank), device)?;
                factors.insert((layer, target), (a, b));
            }
        }
        let h = config.hidden_size;
        let classifier_weight = var(
            uniform(seed ^ 0xC1A5, labels * h, 0.02 * 3f32.sqrt()),
            (labels, h),
            device,
        )?;
        let classifier_bias = Var::from_tensor(&Tensor::zeros(labels, DType::F32, device)?)?;
        Ok(Self {
            factors,
            classifier_weight,
            classifier_bias,
            pooler: None,
            pooling: Pooling::Cls,
            rank,
            scale: alpha / rank as f64,
            dropout: None,
        })
    }

    /// Gives the head a pooler of its own to train, initialised as `BertForSequenceClassification`
    /// initialises a pooler its checkpoint lacks (weights std 0.02, bias zero), seeded. For base models
    /// without a pooler; exported with the adapter (PEFT `modules_to_save`).
    pub fn with_own_pooler(mut self, hidden: usize, seed: u64, device: &Device) -> Result<Self> {
        let weight = var(
            uniform(seed ^ 0x9001, hidden * hidden, 0.02 * 3f32.sqrt()),
            (hidden, hidden),
            device,
        )?;
        let bias = Var::from_tensor(&Tensor::zeros(hidden, DType::F32, device)?)?;
        self.pooler = Some((weight, bias));
        Ok(self)
    }

    /// Gives the head a pooler of its own to train, starting from the base checkpoint's `pooler` (a copy;
    /// the base keeps its own). Exported with the adapter, as PEFT's `modules_to_save = ["pooler"]` saves it.
    pub fn with_pooler_from(mut self, pooler: &crate::model::linear::Linear) -> Result<Self> {
        let weight = Var::from_tensor(&pooler.weight.to_dtype(DType::F32)?.copy()?)?;
        let bias = match &pooler.bias {
            Some(b) => Var::from_tensor(&b.to_dtype(DType::F32)?.copy()?)?,
            None => Var::from_tensor(&Tensor::zeros(weight.dim(0)?, DType::F32, weight.device())?)?,
        };
        self.pooler = Some((weight, bias));
        Ok(self)
    }

    /// Makes the head pool the mean of the tokens (padding excluded) instead of `[CLS]`, as the serving
    /// path's [`Pooling::Mean`] heads do (and sentence-transformers embeds). `BertForSequenceClassification`
    /// cannot express such a head: PEFT loads its weights but pools `[CLS]`.
    pub fn with_mean_pooling(mut self) -> Self {
        self.pooling = Pooling::Mean;
        self.pooler = None;
        self
    }

    /// How the head pools.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Starts from an existing adapter (warm start), keeping its head's pooling; a pooler of the head's own
    /// goes on training with it.
    pub fn from_adapter(adapter: &Adapter, device: &Device) -> Result<Self> {
        let head = adapter
            .head
            .as_ref()
            .ok_or_else(|| ModelError::InvalidInput("the adapter has no head".to_owned()))?;
        let dense = |d: &Dense| -> Result<(Var, Var)> {
            Ok((
                var(d.weight.clone(), (d.out_features, d.in_features), device)?,
                Var::from_tensor(&Tensor::from_vec(d.bias.clone(), d.out_features, device)?)?,
            ))
        };
        let mut factors = BTreeMap::new();
        let (mut rank, mut scale) = (0, 1.0);
        for (layer, target, d) in adapter.deltas() {
            let in_f = d.a.len() / d.rank;
            let out_f = d.b.len() / d.rank;
            factors.insert(
                (layer, target),
                (
                    var(d.a.clone(), (d.rank, in_f), device)?,
                    var(d.b.clone(), (out_f, d.rank), device)?,
                ),
            );
            rank = d.rank;
            scale = d.scale as f64;
        }
        let (classifier_weight, classifier_bias) = dense(&head.classifier)?;
        Ok(Self {
            factors,
            classifier_weight,
            classifier_bias,
            pooler: head.pooler.as_ref().map(dense).transpose()?,
            pooling: head.pooling,
            rank,
            scale,
            dropout: None,
        })
    }

    /// Drops a share `p` of the factors' input values in every forward pass from now on (training only:
    /// [`Self::to_adapter`] exports the factors, and serving never drops); `p = 0` drops nothing. Panics
    /// unless `p` is in `[0, 1)` (job parameters are checked before they get here).
    pub fn with_dropout(mut self, p: f64, seed: u64) -> Self {
        assert!((0.0..1.0).contains(&p), "LoRA dropout {p} is not in [0, 1)");
        self.dropout = (p > 0.0).then(|| Dropout {
            p,
            seed: seed ^ 0xD20F,
            calls: AtomicU64::new(0),
        });
        self
    }

    /// Every trainable variable: the factors, then the head.
    pub fn vars(&self) -> Vec<Var> {
        let mut vars: Vec<Var> = self
            .factors
            .values()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect();
        vars.push(self.classifier_weight.clone());
        vars.push(self.classifier_bias.clone());
        if let Some((w, b)) = &self.pooler {
            vars.extend([w.clone(), b.clone()]);
        }
        vars
    }

    /// The classifier's weight and bias.
    pub fn classifier(&self) -> [&Var; 2] {
        [&self.classifier_weight, &self.classifier_bias]
    }

    /// Number of trainable values.
    pub fn parameter_count(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Class logits `[batch, labels]`: the encoder with the deltas, pooled (`[CLS]` through the pooler — the
    /// head's own when it has one, else the base's, frozen — and tanh; or the token mean), then the
    /// trainable classifier.
    pub fn logits(
        &self,
        bert: &Bert,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        match self.pooling {
            Pooling::Cls => cls_head(
                bert,
                &bert.forward_first_with(input_ids, attention_mask, self)?,
                self.pooler.as_ref(),
                &self.classifier_weight,
                &self.classifier_bias,
            ),
            Pooling::Mean => mean_head(
                &bert.forward_with(input_ids, attention_mask, self)?,
                attention_mask,
                &self.classifier_weight,
                &self.classifier_bias,
            ),
        }
    }

    /// The trained state as an [`Adapter`] the serving path runs.
    pub fn to_adapter(&self, num_layers: usize) -> Result<Adapter> {
        let mut adapter = Adapter::empty(num_layers);
        for (&(layer, target), (a, b)) in &self.factors {
            let delta = LoraDelta {
                a: to_vec(a.as_tensor())?,
                b: to_vec(b.as_tensor())?,
                rank: self.rank,
                scale: self.scale as f32,
            };
            adapter.set(layer, target, delta)?;
        }
        let dense = |weight: &Var, bias: &Var| -> Result<Dense> {
            let (out_features, in_features) = weight.as_tensor().dims2()?;
            Ok(Dense {
                weight: to_vec(weight.as_tensor())?,
                bias: to_vec(bias.as_tensor())?,
                in_features,
                out_features,
            })
        };
        adapter.head = Some(Head {
            pooling: self.pooling,
            pooler: self.pooler.as_ref().map(|(w, b)| dense(w, b)).transpose()?,
            classifier: dense(&self.classifier_weight, &self.classifier_bias)?,
        });
        Ok(adapter)
    }
}

/// The `BertForSequenceClassification` head on `hidden` `[batch, seq, h]`: `[CLS]` through a pooler (`own`,
/// trainable, else `bert`'s) and tanh, then the classifier, in the classifier's format (f32 under bf16
/// autocast).
pub fn cls_head(
    bert: &Bert,
    hidden: &Tensor,
    own: Option<&(Var, Var)>,
    weight: &Var,
    bias: &Var,
) -> Result<Tensor> {
    let cls = hidden.i((.., 0, ..))?;
    let pooled = match own {
        Some((w, b)) => cls
            .to_dtype(w.dtype())?
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?,
        None => bert
            .pooler
            .as_ref()
            .ok_or_else(|| {
                ModelError::Unsupported(
                    "the base model has no pooler for a [CLS] head, and the head has none of its own"
                        .to_owned(),
                )
            })?
            .forward(&cls)?
            .to_dtype(weight.dtype())?,
    };
    let pooled = pooled.tanh()?;
    Ok(pooled
        .matmul(&weight.as_tensor().t()?)?
        .broadcast_add(bias.as_tensor())?)
}

/// A mean-pooling head on `hidden` `[batch, seq, h]`: the mean of each sequence's unpadded tokens
/// (`attention_mask` 1), then the classifier, in the classifier's format.
pub fn mean_head(
    hidden: &Tensor,
    attention_mask: &Tensor,
    weight: &Var,
    bias: &Var,
) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&mask)?.sum(1)?;
    let pooled = sum.broadcast_div(&mask.sum(1)?)?.to_dtype(weight.dtype())?;
    Ok(pooled
        .matmul(&weight.as_tensor().t()?)?
        .broadcast_add(bias.as_tensor())?)
}

impl Deltas for LoraTrainable {
    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.factors.get(&(layer, target)) else {
            return Ok(None);
        };
        // The factors stay f32 under bf16 autocast: the input is raised to them, the delta lowered back.
        let input = x.to_dtype(a.dtype())?;
        let low = match &self.dropout {
            Some(d) => d.apply(&input)?,
            None => input,
        }
        .broadcast_matmul(&a.as_tensor().t()?)?;
        Ok(Some(
            (low.broadcast_matmul(&b.as_tensor().t()?)? * self.scale)?.to_dtype(x.dtype())?,
        ))
    }

    fn low_rank(&self, layer: usize, target: Target) -> Result<Option<LowRank>> {
        Ok(self.factors.get(&(layer, target)).map(|(a, b)| LowRank {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: self.scale,
            dropout: self.dropout.as_ref().map(Dropout::draw),
        }))
    }

    fn all_low_rank(&self) -> bool {
        true
    }
}

/// Cross-entropy of `logits` `[batch, labels]` against `targets` `[batch]` (u32), with label smoothing
/// `smoothing` (the target keeps `1 − smoothing`, the rest is spread evenly), built from differentiable ops,
/// as PyTorch's `CrossEntropyLoss(weight=…, label_smoothing=…)` computes it. Without `class_weights` it is
/// the plain mean. With weights `w` `[labels]`, both parts are divided by the targets' total weight
/// `Σᵢ w[yᵢ]`: the target's part weighs each example by its label's weight, the smoothed part each class's
/// log-probability by that class's own weight.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    smoothing: f64,
    class_weights: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, labels) = logits.dims2()?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    let one_hot = candle_nn::encoding::one_hot(targets.clone(), labels, 1f32, 0f32)?;
    Ok(match class_weights {
        None => {
            let target = ((one_hot * (1.0 - smoothing))? + smoothing / labels as f64)?;
            (target * log_probs)?.sum(D::Minus1)?.neg()?.mean_all()?
        }
        Some(w) => {
            let target_weights = w.index_select(targets, 0)?;
            let nll = (one_hot * &log_probs)?.sum(D::Minus1)?.neg()?;
            let hard = (nll * &target_weights)?.sum_all()?;
            let spread = log_probs
                .broadcast_mul(&w.unsqueeze(0)?)?
                .sum_all()?
                .neg()?;
            ((hard * (1.0 - smoothing))? + (spread * (smoothing / labels as f64))?)?
                .broadcast_div(&target_weights.sum_all()?)?
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use candle_core::{Device, Tensor};

    use super::Dropout;

    fn dropout(p: f64, seed: u64) -> Dropout {
        Dropout {
            p,
            seed,
            calls: AtomicU64::new(0),
        }
    }

    fn mask(d: &Dropout) -> Vec<f32> {
        let ones = Tensor::ones((100, 400), candle_core::DType::F32, &Device::Cpu).unwrap();
        d.apply(&ones)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn dropout_zeroes_about_p_keeps_the_expectation_and_draws_a_seeded_mask_per_call() {
        let d = dropout(0.1, 7);
        let first = mask(&d);
        let dropped = first.iter().filter(|&&v| v == 0.0).count() as f64 / first.len() as f64;
        assert!((dropped - 0.1).abs() < 0.01, "dropped {dropped}");
        assert!(first
            .iter()
            .all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        let mean = first.iter().map(|&v| v as f64).sum::<f64>() / first.len() as f64;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        let second = mask(&d);
        assert_ne!(first, second, "each call draws a new mask");
        let again = dropout(0.1, 7);
        assert_eq!(mask(&again), first, "the same seed gives the same masks");
    }
}
