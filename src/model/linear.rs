//! `Linear`: the dense layer every projection of the encoder is built on.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::error::Result;

/// A dense layer `y = x·Wᵀ + b` with PyTorch's weight layout `[out, in]`.
///
/// The LoRA work extends this type with low-rank deltas selected per row; the base product stays one
/// matmul for the whole batch.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`, absent for bias-free layers.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` and `bias` from `vb` (the module's prefix), checking shapes.
    pub fn load(vb: VarBuilder, in_features: usize, out_features: usize) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = vb.get(out_features, "bias")?;
        Ok(Self {
            weight,
            bias: Some(bias),
        })
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// LayerNorm over the last dimension, built from differentiable elementwise ops (candle's fused
/// `layer_norm` records no backward).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale, `[hidden]`.
    pub weight: Tensor,
    /// Shift, `[hidden]`.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` from `vb`.
    pub fn load(vb: VarBuilder, hidden: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(hidden, "weight")?,
            bias: vb.get(hidden, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let last = x.rank() - 1;
        let mean = x.mean_keepdim(last)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(last)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}
