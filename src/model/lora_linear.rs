//! A frozen linear and its trainable low-rank (LoRA) delta as one op on the CPU:
//! `y = x·Wᵀ + b + s · (drop(x)·Aᵀ)·Bᵀ`.
//!
//! Composed from candle ops the delta costs, per linear and step, a dropout mask tensor, a masked copy of
//! the input, two batched products, a scaling and a sum; the backward pass repeats each, and candle adds
//! every gradient it accumulates into a freshly zeroed buffer. Here the forward pass adds the two small
//! products into the linear's output, and the backward pass writes the input's gradient once (not at all
//! when the input needs none) and the factors' gradients directly. The dropout mask is one byte per value,
//! drawn once and reused by the backward pass.

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::error::Result;
use super::kernels;
use super::linear::{by_blocks, cpu_f32, ending_in, f32_slice, with_last, Linear};

/// One draw of dropout on a delta's input: values are kept with probability `1 − p` and scaled by
/// `1 / (1 − p)`; the mask follows from `seed` alone.
#[derive(Debug, Clone, Copy)]
pub struct DropoutDraw {
    /// Share of values dropped, in `[0, 1)`.
    pub p: f64,
    /// Seed of this draw's mask.
    pub seed: u64,
}

impl DropoutDraw {
    /// The keep mask of `n` values: 1 where kept, 0 where dropped. Each value compares 16 random bits with
    /// `(1 − p)·2¹⁶`, so `p` is honoured to within 2⁻¹⁶.
    pub fn mask(&self, n: usize) -> Vec<u8> {
        let threshold = ((1.0 - self.p) * 65536.0).round() as u64;
        let mut rng = crate::rng::Rng::new(self.seed);
        let mut mask = Vec::with_capacity(n + 3);
        while mask.len() < n {
            let bits = rng.next_u64();
            mask.extend((0..4).map(|i| u8::from((bits >> (16 * i)) & 0xFFFF < threshold)));
        }
        mask.truncate(n);
        mask
    }

    /// The factor kept values are scaled by, `1 / (1 − p)`.
    pub fn scale(&self) -> f32 {
        (1.0 / (1.0 - self.p)) as f32
    }
}

/// The trainable factors of one linear's delta `s · (drop(x)·Aᵀ)·Bᵀ`.
pub struct LowRank {
    /// `A`, `[rank, in_features]`.
    pub a: Tensor,
    /// `B`, `[out_features, rank]`.
    pub b: Tensor,
    /// `s` (LoRA's `alpha / rank`).
    pub scale: f64,
    /// Dropout on the delta's input (training only), if any.
    pub dropout: Option<DropoutDraw>,
}

/// Whether [`forward`] can run `linear` on `x` as one op: f32 input and frozen f32 weights on the CPU.
pub fn fusable(linear: &Linear, x: &Tensor) -> bool {
    let frozen_f32 = |t: &Tensor| !t.is_variable() && t.dtype() == DType::F32;
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && frozen_f32(&linear.weight)
        && linear.bias.as_ref().is_none_or(frozen_f32)
}

/// `linear(x)` plus the delta, as one op whose backward pass yields the gradients of `x` and of the
/// factors; `linear` and `x` must be [`fusable`], the factors f32 on the CPU.
pub fn forward(linear: &Linear, x: &Tensor, delta: &LowRank) -> Result<Tensor> {
    let op = LoraLinear {
        weight: linear.weight.clone(),
        bias: linear.bias.clone(),
        scale: delta.scale as f32,
        dropout: delta.dropout,
        mask: OnceLock::new(),
    };
    Ok(x.contiguous()?.apply_op3(&delta.a, &delta.b, op)?)
}

struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f32,
    dropout: Option<DropoutDraw>,
    /// The keep mask the forward pass drew, for the backward pass.
    mask: OnceLock<Vec<u8>>,
}

impl LoraLinear {
    /// `x` as the delta sees it: masked and scaled under dropout, as it is otherwise.
    fn dropped<'a>(&self, x: &'a [f32]) -> Cow<'a, [f32]> {
        match (&self.dropout, self.mask.get()) {
            (Some(d), Some(mask)) => {
                let scale = d.scale();
                Cow::Owned(
                    x.iter()
                        .zip(mask)
                        .map(|(&v, &m)| v * f32::from(m) * scale)
                        .collect(),
                )
            }
            _ => Cow::Borrowed(x),
        }
    }

    /// `(out, in, rank)`, checked against the factors' shapes.
    fn dims(&self, a: &Layout, b: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (n, k) = self.weight.dims2()?;
        let (rank, a_in) = a.shape().dims2()?;
        let (b_out, b_rank) = b.shape().dims2()?;
        if (a_in, b_out, b_rank) != (k, n, rank) {
            return Err(candle_core::Error::Msg(format!(
                "lora-linear: factors {:?} and {:?} do not fit a {n} × {k} weight",
                a.shape(),
                b.shape()
            )));
        }
        Ok((n, k, rank))
    }
}

/// A copy of a (small) CPU tensor's f32 values.
fn values(t: &Tensor, what: &str) -> candle_core::Result<Vec<f32>> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    Ok(cpu_f32(&storage, layout, what)?.to_vec())
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k, rank) = self.dims(l2, l3)?;
        let dims = ending_in(l1, k, "lora-linear input")?;
        let x = f32_slice(s1, l1, "lora-linear input")?;
        let a = f32_slice(s2, l2, "lora-linear A")?;
        let b = f32_slice(s3, l3, "lora-linear B")?;
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let w = cpu_f32(&w_storage, w_layout, "lora-linear weight")?;
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias_guard {
            Some((storage, layout)) => Some(cpu_f32(storage, layout, "lora-linear bias")?),
            None => None,
        };
        let rows = x.len() / k.max(1);
        let mut out = by_blocks(x, k, n, |rows, x, out| {
            kernels::linear(x, rows, k, w, bias, n, out)
        });
        crate::pressure::yield_point();
        if let Some(d) = &self.dropout {
            self.mask.get_or_init(|| d.mask(x.len()));
        }
        let mut low = vec![0f32; rows * rank];
        kernels::linear(&self.dropped(x), rows, k, a, None, rank, &mut low);
        kernels::add_linear(&low, rows, rank, b, n, self.scale, &mut out);
        Ok((CpuStorage::F32(out), with_last(dims, n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k, rank) = self.dims(a.layout(), b.layout())?;
        let grad = grad.contiguous()?;
        let (g_storage, g_layout) = grad.storage_and_layout();
        let g = cpu_f32(&g_storage, g_layout, "lora-linear gradient")?;
        let input = x.contiguous()?;
        let (x_storage, x_layout) = input.storage_and_layout();
        let x_values = cpu_f32(&x_storage, x_layout, "lora-linear input")?;
        let (a_values, b_values) = (values(a, "lora-linear A")?, values(b, "lora-linear B")?);
        let rows = g.len() / n.max(1);
        // The gradient reaching the low-rank activations, before the scale s: g·B.
        let mut d_low = vec![0f32; rows * rank];
        kernels::matmul(g, rows, n, &b_values, rank, &mut d_low);
        // Only an input that depends on a variable needs its gradient (the first layer's does not).
        let d_x = if x.track_op() {
            let (w_storage, w_layout) = self.weight.storage_and_layout();
            let w = cpu_f32(&w_storage, w_layout, "lora-linear weight")?;
            let mut d_x = by_blocks(g, n, k, |rows, g, out| {
                kernels::matmul(g, rows, n, w, k, out)
            });
            crate::pressure::yield_point();
            match (&self.dropout, self.mask.get()) {
                (Some(d), Some(mask)) => {
                    let mut through = vec![0f32; rows * k];
                    kernels::matmul(&d_low, rows, rank, &a_values, k, &mut through);
                    let scale = self.scale * d.scale();
                    for ((dx, t), &m) in d_x.iter_mut().zip(&through).zip(mask) {
                        *dx += scale * f32::from(m) * t;
                    }
                }
                _ => kernels::add_matmul(&d_low, rows, rank, &a_values, k, self.scale, &mut d_x),
            }
            Some(Tensor::from_vec(d_x, x.shape(), x.device())?)
        } else {
            None
        };
        crate::pressure::yield_point();
        let dropped = self.dropped(x_values);
        let scaled = |mut v: Vec<f32>| {
            v.iter_mut().for_each(|v| *v *= self.scale);
            v
        };
        // dA = s · d_lowᵀ·drop(x); dB = s · gᵀ·(drop(x)·Aᵀ). The bias sums the kernel adds are unused.
        let mut d_a = vec![0f32; rank * k];
        kernels::weight_gradient(
            &d_low,
            &dropped,
            rows,
            rank,
            k,
            &mut d_a,
            &mut vec![0f32; rank],
        );
        let mut low = vec![0f32; rows * rank];
        kernels::linear(&dropped, rows, k, &a_values, None, rank, &mut low);
        let mut d_b = vec![0f32; n * rank];
        kernels::weight_gradient(g, &low, rows, n, rank, &mut d_b, &mut vec![0f32; n]);
        Ok((
            d_x,
            Some(Tensor::from_vec(scaled(d_a), (rank, k), a.device())?),
            Some(Tensor::from_vec(scaled(d_b), (n, rank), b.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};
    use candle_nn::Module;

    use super::{forward, DropoutDraw, LowRank};
    use crate::model::linear::Linear;
    use crate::model::tiny::max_abs_diff;

    fn var(shape: &[usize], seed: u64) -> Var {
        let n = shape.iter().product();
        let t = Tensor::from_vec(
            crate::rng::Rng::new(seed).uniform(n, 1.0),
            shape,
            &Device::Cpu,
        );
        Var::from_tensor(&t.unwrap()).unwrap()
    }

    /// The op against the same delta composed from candle ops, with the op's own mask: outputs, and the
    /// gradients of the input (when it tracks one) and both factors.
    fn check(dropout: Option<DropoutDraw>, input_trains: bool) {
        let (rows, k, n, rank) = (300, 6, 5, 2);
        let linear = Linear {
            weight: var(&[n, k], 1).as_tensor().detach(),
            bias: Some(var(&[n], 2).as_tensor().detach()),
        };
        let (a, b) = (var(&[rank, k], 3), var(&[n, rank], 4));
        // A chain of 3 × 100 rows (more than one block), trainable or a constant.
        let x_var = var(&[3, 100, k], 5);
        let x = if input_trains {
            x_var.as_tensor().clone()
        } else {
            x_var.as_tensor().detach()
        };
        let delta = LowRank {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 2.5,
            dropout,
        };
        let y = forward(&linear, &x, &delta).unwrap();
        let dropped = match dropout {
            Some(d) => {
                let mask: Vec<f32> = d
                    .mask(rows * k)
                    .iter()
                    .map(|&m| f32::from(m) * d.scale())
                    .collect();
                (&x * Tensor::from_vec(mask, x.shape(), &Device::Cpu).unwrap()).unwrap()
            }
            None => x.clone(),
        };
        let reference = (linear.forward(&x).unwrap()
            + (dropped
                .broadcast_matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_matmul(&b.as_tensor().t().unwrap())
                .unwrap()
                * 2.5)
                .unwrap())
        .unwrap();
        assert_eq!(y.dims(), &[3, 100, n]);
        assert!(max_abs_diff(&y, &reference) < 1e-4, "outputs differ");
        // A loss whose gradient differs per row and column.
        let weights = var(&[3, 100, n], 6).as_tensor().detach();
        let loss = |t: &Tensor| {
            (t * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (g, g_ref) = (loss(&y), loss(&reference));
        for (name, v) in [("A", &a), ("B", &b)] {
            let (got, want) = (
                g.get(v.as_tensor()).unwrap(),
                g_ref.get(v.as_tensor()).unwrap(),
            );
            assert!(max_abs_diff(got, want) < 1e-3, "{name} gradients differ");
            assert!(
                got.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        }
        if input_trains {
            let (got, want) = (g.get(&x).unwrap(), g_ref.get(&x).unwrap());
            assert!(max_abs_diff(got, want) < 1e-3, "input gradients differ");
        } else {
            assert!(g.get(&x).is_none(), "a constant input gets no gradient");
        }
    }

    #[test]
    fn the_fused_delta_matches_the_composed_one_in_output_and_gradients() {
        check(None, true);
        check(None, false);
    }

    #[test]
    fn under_dropout_the_fused_delta_matches_the_composed_one_with_the_same_mask() {
        let draw = DropoutDraw { p: 0.3, seed: 11 };
        check(Some(draw), true);
        check(Some(draw), false);
    }

    #[test]
    fn a_dropout_mask_drops_about_p_and_follows_its_seed() {
        let draw = DropoutDraw { p: 0.1, seed: 7 };
        let mask = draw.mask(100_001);
        assert_eq!(mask.len(), 100_001);
        let dropped = mask.iter().filter(|&&m| m == 0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        assert_eq!(draw.mask(100_001), mask);
        assert_ne!(DropoutDraw { p: 0.1, seed: 8 }.mask(100_001), mask);
    }
}
