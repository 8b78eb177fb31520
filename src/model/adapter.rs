//! Low-rank adapters (LoRA) and classification heads in the form the CPU serving path runs.
//!
//! An [`Adapter`] holds, per layer, optional low-rank deltas `ΔW = scale · B·A` for any of the six linears
//! of a BERT layer, and optionally a classification head. Adapters are chosen per sequence at forward time
//! (see [`super::cpu_encoder::CpuEncoder::forward_adapted`]): the base GEMM runs once over the whole batch and each
//! run of consecutive sequences sharing an adapter adds its delta; sequences without an adapter pay nothing.
//! This module knows nothing of files or lifecycles.

use serde::{Deserialize, Serialize};

use super::error::{ModelError, Result};
use super::hf_config::BertConfig;
use super::kernels;

/// A linear of a BERT layer that an adapter may target, named as in Hugging Face's `BertLayer`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// `attention.self.query`.
    Query,
    /// `attention.self.key`.
    Key,
    /// `attention.self.value`.
    Value,
    /// `attention.output.dense`.
    AttentionOutput,
    /// `intermediate.dense`.
    Intermediate,
    /// `output.dense`.
    Output,
}

impl Target {
    /// Every target, in layer order.
    pub const ALL: [Target; 6] = [
        Target::Query,
        Target::Key,
        Target::Value,
        Target::AttentionOutput,
        Target::Intermediate,
        Target::Output,
    ];

    /// The module's path inside `encoder.layer.N`.
    pub fn module_path(self) -> &'static str {
        match self {
            Target::Query => "attention.self.query",
            Target::Key => "attention.self.key",
            Target::Value => "attention.self.value",
            Target::AttentionOutput => "attention.output.dense",
            Target::Intermediate => "intermediate.dense",
            Target::Output => "output.dense",
        }
    }

    /// Parses a module path inside `encoder.layer.N`.
    pub fn from_module_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.module_path() == path)
    }

    /// `(in_features, out_features)` of the targeted linear.
    pub fn shape(self, config: &BertConfig) -> (usize, usize) {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        match self {
            Target::Intermediate => (h, i),
            Target::Output => (i, h),
            _ => (h, h),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One low-rank delta: `y += scale · (x·Aᵀ)·Bᵀ`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraDelta {
    /// `A`, `[rank × in_features]` row-major.
    pub a: Vec<f32>,
    /// `B`, `[out_features × rank]` row-major.
    pub b: Vec<f32>,
    /// The rank `r`.
    pub rank: usize,
    /// `alpha / r` (or `alpha / √r` for rsLoRA).
    pub scale: f32,
}

impl LoraDelta {
    /// Checks the factor shapes against the targeted linear.
    pub fn validate(&self, in_features: usize, out_features: usize) -> Result<()> {
        if self.rank == 0
            || self.a.len() != self.rank * in_features
            || self.b.len() != out_features * self.rank
        {
            return Err(ModelError::Weights(format!(
                "LoRA factors of rank {} do not fit a {in_features}→{out_features} linear (A has {} values, B {})",
                self.rank,
                self.a.len(),
                self.b.len()
            )));
        }
        if !self.scale.is_finite() {
            return Err(ModelError::Weights("LoRA scale is not finite".to_owned()));
        }
        Ok(())
    }

    /// Adds this delta to rows `x` (`[rows × in]`) of an output `out` (`[rows × out]`).
    pub fn apply(
        &self,
        x: &[f32],
        rows: usize,
        in_features: usize,
        out: &mut [f32],
        out_features: usize,
    ) {
        let mut low = vec![0.0; rows * self.rank];
        kernels::linear(x, rows, in_features, &self.a, None, self.rank, &mut low);
        kernels::add_linear_into(
            &low,
            rows,
            self.rank,
            &self.b,
            self.scale,
            out,
            kernels::Columns::all(out_features),
        );
    }

    /// `scale · B·A`, `[out × in]`: the dense delta merged into a base weight.
    pub fn dense(&self, in_features: usize, out_features: usize) -> Vec<f32> {
        let mut w = vec![0.0; out_features * in_features];
        for o in 0..out_features {
            for k in 0..self.rank {
                let b = self.b[o * self.rank + k] * self.scale;
                for (wi, ai) in w[o * in_features..(o + 1) * in_features]
                    .iter_mut()
                    .zip(&self.a[k * in_features..])
                {
                    *wi += b * ai;
                }
            }
        }
        w
    }
}

/// How a classification head pools the encoder's output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// `BertForSequenceClassification`: `[CLS]` → pooler dense + tanh → classifier.
    #[default]
    Cls,
    /// Mean over tokens → classifier.
    Mean,
}

/// A dense layer in plain buffers: `weight` `[out × in]`, `bias` `[out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    /// `[out × in]` row-major.
    pub weight: Vec<f32>,
    /// `[out]`.
    pub bias: Vec<f32>,
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
}

impl Dense {
    /// Checks the buffers against the declared widths.
    pub fn validate(&self) -> Result<()> {
        if self.weight.len() != self.in_features * self.out_features
            || self.bias.len() != self.out_features
        {
            return Err(ModelError::Weights(format!(
                "dense layer {}→{} has {} weights and {} biases",
                self.in_features,
                self.out_features,
                self.weight.len(),
                self.bias.len()
            )));
        }
        Ok(())
    }

    /// `x·Wᵀ + b` for `rows` rows.
    pub fn run(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * self.out_features];
        self.run_into(x, rows, &mut out);
        out
    }

    /// `out = x·Wᵀ + b` for `rows` rows, into a caller's buffer.
    pub fn run_into(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        kernels::linear(
            x,
            rows,
            self.in_features,
            &self.weight,
            Some(&self.bias),
            self.out_features,
            out,
        );
    }
}

/// A classification head: pooling, an optional replacement pooler, and the classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// How tokens are pooled.
    pub pooling: Pooling,
    /// A trained `pooler.dense` replacing the base model's (CLS pooling only).
    pub pooler: Option<Dense>,
    /// `classifier`: `[labels × hidden]`.
    pub classifier: Dense,
}

/// Low-rank deltas per layer and target, and an optional head.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    layers: Vec<[Option<LoraDelta>; 6]>,
    /// The classification head, if the adapter classifies.
    pub head: Option<Head>,
}

impl Adapter {
    /// An adapter with no deltas and no head for a model of `layers` layers.
    pub fn empty(layers: usize) -> Self {
        Self {
            layers: vec![Default::default(); layers],
            head: None,
        }
    }

    /// Sets the delta of `target` in `layer`.
    pub fn set(&mut self, layer: usize, target: Target, delta: LoraDelta) -> Result<()> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::Weights(format!("layer {layer} does not exist")))?;
        slot[target.index()] = Some(delta);
        Ok(())
    }

    /// The delta of `target` in `layer`, if any.
    pub fn delta(&self, layer: usize, target: Target) -> Option<&LoraDelta> {
        self.layers
            .get(layer)
            .and_then(|l| l[target.index()].as_ref())
    }

    /// Every `(layer, target, delta)`.
    pub fn deltas(&self) -> impl Iterator<Item = (usize, Target, &LoraDelta)> {
        self.layers.iter().enumerate().flat_map(|(i, l)| {
            Target::ALL
                .into_iter()
                .filter_map(move |t| l[t.index()].as_ref().map(|d| (i, t, d)))
        })
    }

    /// Number of layers the adapter spans.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Checks every shape against `config`.
    pub fn validate(&self, config: &BertConfig) -> Result<()> {
        if self.layers.len() != config.num_hidden_layers {
            return Err(ModelError::Weights(format!(
                "adapter spans {} layers, the model has {}",
                self.layers.len(),
                config.num_hidden_layers
            )));
        }
        for (_, target, delta) in self.deltas() {
            let (i, o) = target.shape(config);
            delta.validate(i, o)?;
        }
        if let Some(head) = &self.head {
            head.classifier.validate()?;
            if head.classifier.in_features != config.hidden_size
                || head.classifier.out_features == 0
            {
                return Err(ModelError::Weights(format!(
                    "classifier takes {} inputs, the model's hidden size is {}",
                    head.classifier.in_features, config.hidden_size
                )));
            }
            if let Some(p) = &head.pooler {
                p.validate()?;
                if p.in_features != config.hidden_size || p.out_features != config.hidden_size {
                    return Err(ModelError::Weights(
                        "pooler is not hidden × hidden".to_owned(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Trainable values: every factor and the head.
    pub fn parameter_count(&self) -> usize {
        let deltas: usize = self.deltas().map(|(_, _, d)| d.a.len() + d.b.len()).sum();
        let head = self.head.as_ref().map_or(0, |h| {
            h.classifier.weight.len()
                + h.classifier.bias.len()
                + h.pooler
                    .as_ref()
                    .map_or(0, |p| p.weight.len() + p.bias.len())
        });
        deltas + head
    }
}
