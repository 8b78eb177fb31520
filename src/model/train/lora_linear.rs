//! A frozen linear and its trainable low-rank (LoRA) delta as one op on the CPU:
//! `y = x·Wᵀ + b + s · (drop(x)·Aᵀ)·Bᵀ`.
//!
//! Composed from candle ops the delta costs, per linear and step, a dropout mask tensor, a masked copy of
//! the input, two batched products, a scaling and a sum; the backward pass repeats each, and candle adds
//! every gradient it accumulates into a freshly zeroed buffer. Here the forward pass adds the two small
//! products into the linear's output, and the backward pass returns the input's gradient as one tensor (none
//! when the input needs none) and the factors' gradients as another. The dropout mask is one byte per value,
//! drawn once and reused by the backward pass.

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Shape, Tensor};

use crate::model::error::{ModelError, Result};
use crate::model::kernels::{self, Columns};
use crate::model::linear::{
    cpu_f32, ending_in, f32_slice, frozen_input_gradient, frozen_product, with_last, Linear,
};

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
    // Not `is_variable`: a weight derived from a variable (a cast copy) trains too.
    let frozen_f32 = |t: &Tensor| !t.track_op() && t.dtype() == DType::F32;
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && frozen_f32(&linear.weight)
        && linear.bias.as_ref().is_none_or(frozen_f32)
}

/// `linear(x)` plus the delta, as one op whose backward pass yields the gradients of `x` and of the
/// factors; `linear` and `x` must be [`fusable`], the factors f32 on the CPU.
pub fn forward(linear: &Linear, x: &Tensor, delta: LowRank) -> Result<Tensor> {
    forward_joined(vec![(linear, Some(delta))], x)
}

/// Linears that share their input (`[.., in]`), side by side: `[.., Σ out]`, each linear's output plus its
/// delta where it has one, as one op. The frozen products are one wider product, and the input's gradient
/// one product and one buffer, where separate linears take one each and a sum. Every linear must be
/// [`fusable`] with `x`, all with biases or none.
pub fn forward_joined(parts: Vec<(&Linear, Option<LowRank>)>, x: &Tensor) -> Result<Tensor> {
    let mut factors = Vec::new();
    let group = LoraGroup::new(parts, &mut factors)?;
    if !group.has_deltas() {
        return Ok(group.linear.forward(x)?);
    }
    Ok(x.contiguous()?
        .apply_op2(&Tensor::cat(&factors, 0)?, LoraLinear(group))?)
}

/// Frozen linears side by side that share an input, with low-rank deltas on some of them: the computation
/// of [`forward_joined`]'s op on plain slices, which the fused encoder layer ([`super::encoder_layer`]) runs
/// too. The factors come packed in one flat input shared by every group of an op.
pub(crate) struct LoraGroup {
    linear: Linear,
    slots: Vec<Slot>,
}

impl LoraGroup {
    /// Joins `parts` (every linear [`fusable`], all with biases or none) and appends their deltas' factors,
    /// flattened, to `factors`: the packed input is their concatenation, and each delta records where its
    /// own lie in it.
    pub(crate) fn new(
        parts: Vec<(&Linear, Option<LowRank>)>,
        factors: &mut Vec<Tensor>,
    ) -> Result<Self> {
        let (weight, bias) = match parts.as_slice() {
            [(linear, _)] => (linear.weight.clone(), linear.bias.clone()),
            _ => {
                let weights: Vec<&Tensor> = parts.iter().map(|(l, _)| &l.weight).collect();
                let biases: Option<Vec<&Tensor>> =
                    parts.iter().map(|(l, _)| l.bias.as_ref()).collect();
                let bias = match biases {
                    Some(b) => Some(Tensor::cat(&b, 0)?),
                    None if parts.iter().all(|(l, _)| l.bias.is_none()) => None,
                    None => {
                        return Err(ModelError::Unsupported(
                            "joined linears must all have biases or none".to_owned(),
                        ))
                    }
                };
                (Tensor::cat(&weights, 0)?, bias)
            }
        };
        let stride = weight.dim(0)?;
        let (mut slots, mut start) = (Vec::new(), 0);
        for (linear, delta) in parts {
            let width = linear.out_features();
            if let Some(delta) = delta {
                let rank = delta.a.dim(0)?;
                let a_at = factors.iter().map(Tensor::elem_count).sum::<usize>();
                let b_at = a_at + delta.a.elem_count();
                for f in [&delta.a, &delta.b] {
                    if !f.device().is_cpu() || f.dtype() != DType::F32 {
                        return Err(ModelError::Unsupported(
                            "the fused LoRA op needs f32 factors on the CPU".to_owned(),
                        ));
                    }
                }
                let (a_dims, b_dims) = (delta.a.dims2()?, delta.b.dims2()?);
                if a_dims != (rank, linear.in_features()) || b_dims != (width, rank) {
                    return Err(ModelError::InvalidInput(format!(
                        "LoRA factors {a_dims:?} and {b_dims:?} do not fit a {width} × {} linear",
                        linear.in_features()
                    )));
                }
                factors.push(delta.a.flatten_all()?);
                factors.push(delta.b.flatten_all()?);
                slots.push(Slot {
                    cols: Columns {
                        start,
                        width,
                        stride,
                    },
                    rank,
                    a_at,
                    b_at,
                    scale: delta.scale as f32,
                    dropout: delta.dropout,
                    mask: OnceLock::new(),
                });
            }
            start += width;
        }
        Ok(Self {
            linear: Linear { weight, bias },
            slots,
        })
    }

    /// Whether any of the linears has a delta.
    pub(crate) fn has_deltas(&self) -> bool {
        !self.slots.is_empty()
    }

    /// `(out, in)` of the joined weight.
    pub(crate) fn dims(&self) -> candle_core::Result<(usize, usize)> {
        self.linear.weight.dims2()
    }

    /// The outputs side by side, `[rows × out]`, for an input `x` of `[rows × in]`; draws the dropout masks.
    pub(crate) fn forward(&self, x: &[f32], packed: &[f32]) -> candle_core::Result<Vec<f32>> {
        let (_, k) = self.dims()?;
        let mut out = frozen_product(&self.linear, x)?;
        let rows = x.len() / k.max(1);
        for slot in &self.slots {
            crate::pressure::yield_point();
            let (a, b) = slot.factors(packed, k)?;
            if let Some(d) = &slot.dropout {
                slot.mask.get_or_init(|| d.mask(x.len()));
            }
            let mut low = vec![0f32; rows * slot.rank];
            kernels::linear(&slot.dropped(x)?, rows, k, a, None, slot.rank, &mut low);
            kernels::add_linear_into(&low, rows, slot.rank, b, slot.scale, &mut out, slot.cols);
        }
        Ok(out)
    }

    /// The backward pass from the output's gradient `g` (`[rows × out]`) for the input `x` the forward pass
    /// saw: the factors' gradients go to their places in `d_factors` (laid out as the packed factors), and
    /// the input's gradient is returned when `input_gradient` asks for it.
    pub(crate) fn backward(
        &self,
        x: &[f32],
        g: &[f32],
        packed: &[f32],
        input_gradient: bool,
        d_factors: &mut [f32],
    ) -> candle_core::Result<Option<Vec<f32>>> {
        let (n, k) = self.dims()?;
        let rows = g.len() / n.max(1);
        if self.has_deltas() && x.len() != rows * k {
            return Err(candle_core::Error::Msg(format!(
                "lora-linear: input of {} values for a gradient of {rows} rows of {k}",
                x.len()
            )));
        }
        // Per delta, the gradient reaching its low-rank activations, before the scale s: g[:, cols]·B.
        let d_lows = self
            .slots
            .iter()
            .map(|slot| {
                let (_, b) = slot.factors(packed, k)?;
                let mut d_low = vec![0f32; rows * slot.rank];
                kernels::matmul_from(g, slot.cols, rows, b, slot.rank, &mut d_low);
                Ok(d_low)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let d_x = if input_gradient {
            let mut d_x = frozen_input_gradient(&self.linear.weight, g)?;
            for (slot, d_low) in self.slots.iter().zip(&d_lows) {
                crate::pressure::yield_point();
                let (a, _) = slot.factors(packed, k)?;
                match slot.mask()? {
                    Some((mask, keep_scale)) => {
                        let mut through = vec![0f32; rows * k];
                        kernels::matmul(d_low, rows, slot.rank, a, k, &mut through);
                        let scale = slot.scale * keep_scale;
                        for ((dx, t), &m) in d_x.iter_mut().zip(&through).zip(mask) {
                            *dx += scale * f32::from(m) * t;
                        }
                    }
                    None => kernels::add_matmul(d_low, rows, slot.rank, a, k, slot.scale, &mut d_x),
                }
            }
            Some(d_x)
        } else {
            None
        };
        // dA = s · d_lowᵀ·drop(x); dB = s · g[:, cols]ᵀ·(drop(x)·Aᵀ).
        for (slot, d_low) in self.slots.iter().zip(&d_lows) {
            crate::pressure::yield_point();
            let (a, _) = slot.factors(packed, k)?;
            let dropped = slot.dropped(x)?;
            let (d_a, d_b) = slot.factors_mut(d_factors, k)?;
            kernels::transposed_product(
                d_low,
                Columns::all(slot.rank),
                &dropped,
                rows,
                k,
                slot.scale,
                d_a,
            );
            let mut low = vec![0f32; rows * slot.rank];
            kernels::linear(&dropped, rows, k, a, None, slot.rank, &mut low);
            kernels::transposed_product(g, slot.cols, &low, rows, slot.rank, slot.scale, d_b);
        }
        Ok(d_x)
    }
}

/// One linear's delta in a [`LoraGroup`]: its columns of the output, and where its factors lie in the
/// packed factor input (`A` `[rank × in]` at `a_at`, `B` `[width × rank]` at `b_at`).
struct Slot {
    cols: Columns,
    rank: usize,
    a_at: usize,
    b_at: usize,
    scale: f32,
    dropout: Option<DropoutDraw>,
    /// The keep mask the forward pass drew, for the backward pass.
    mask: OnceLock<Vec<u8>>,
}

impl Slot {
    /// The keep mask and the kept values' scale under dropout; `None` without.
    fn mask(&self) -> candle_core::Result<Option<(&[u8], f32)>> {
        match (&self.dropout, self.mask.get()) {
            (Some(d), Some(mask)) => Ok(Some((mask, d.scale()))),
            (None, _) => Ok(None),
            (Some(_), None) => Err(candle_core::Error::Msg(
                "lora-linear: no dropout mask drawn (the forward pass did not run)".to_owned(),
            )),
        }
    }

    /// `x` as the delta sees it: masked and scaled under dropout, as it is otherwise.
    fn dropped<'a>(&self, x: &'a [f32]) -> candle_core::Result<Cow<'a, [f32]>> {
        Ok(match self.mask()? {
            Some((mask, scale)) => Cow::Owned(
                x.iter()
                    .zip(mask)
                    .map(|(&v, &m)| v * f32::from(m) * scale)
                    .collect(),
            ),
            None => Cow::Borrowed(x),
        })
    }

    /// Where `A` and `B` lie in the packed factors, for an input `k` wide.
    fn ranges(&self, k: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        (
            self.a_at..self.a_at + self.rank * k,
            self.b_at..self.b_at + self.cols.width * self.rank,
        )
    }

    /// `(A, B)` within the packed factors, for an input `k` wide.
    fn factors<'a>(
        &self,
        packed: &'a [f32],
        k: usize,
    ) -> candle_core::Result<(&'a [f32], &'a [f32])> {
        let (a, b) = self.ranges(k);
        match (packed.get(a), packed.get(b)) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(too_short()),
        }
    }

    /// `(A, B)`'s places in a buffer laid out as the packed factors (their gradients).
    fn factors_mut<'a>(
        &self,
        buffer: &'a mut [f32],
        k: usize,
    ) -> candle_core::Result<(&'a mut [f32], &'a mut [f32])> {
        let (a, b) = self.ranges(k);
        // A precedes B in the packing, so splitting at B's start separates them.
        if a.end > b.start || b.end > buffer.len() {
            return Err(too_short());
        }
        let (head, tail) = buffer.split_at_mut(b.start);
        Ok((&mut head[a], &mut tail[..b.len()]))
    }
}

fn too_short() -> candle_core::Error {
    candle_core::Error::Msg("lora-linear: the packed factors are too short".to_owned())
}

/// [`forward_joined`]'s op: a [`LoraGroup`] whose second input is its packed factors.
struct LoraLinear(LoraGroup);

impl CustomOp2 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims()?;
        let dims = ending_in(l1, k, "lora-linear input")?;
        let x = f32_slice(s1, l1, "lora-linear input")?;
        let packed = f32_slice(s2, l2, "lora-linear factors")?;
        let out = self.0.forward(x, packed)?;
        Ok((CpuStorage::F32(out), with_last(dims, n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        factors: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        backward_over_factors(
            "lora-linear",
            (x, factors, grad),
            |g, x_values, packed, d_factors| {
                // Only an input that depends on a variable needs its gradient (the first layer's does not).
                self.0
                    .backward(x_values, g, packed, x.track_op(), d_factors)
            },
        )
    }
}

/// The backward pass of an op whose inputs are an activation `x` and packed factors (the LoRA op's, the
/// encoder layer's): hands `pass` the CPU f32 values of the output's gradient, of `x` and of the factors, and a
/// zeroed buffer for the factors' gradient; `pass` returns `x`'s gradient when it computes one. `what`
/// names the op in errors.
pub(crate) fn backward_over_factors(
    what: &str,
    (x, factors, grad): (&Tensor, &Tensor, &Tensor),
    pass: impl FnOnce(&[f32], &[f32], &[f32], &mut [f32]) -> candle_core::Result<Option<Vec<f32>>>,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let (g_storage, g_layout) = grad.storage_and_layout();
    let g = cpu_f32(&g_storage, g_layout, &format!("{what} gradient"))?;
    let input = x.contiguous()?;
    let (x_storage, x_layout) = input.storage_and_layout();
    let x_values = cpu_f32(&x_storage, x_layout, &format!("{what} input"))?;
    let packed = factors.contiguous()?;
    let (f_storage, f_layout) = packed.storage_and_layout();
    let packed = cpu_f32(&f_storage, f_layout, &format!("{what} factors"))?;
    let mut d_factors = vec![0f32; packed.len()];
    let d_x = pass(g, x_values, packed, &mut d_factors)?
        .map(|d_x| Tensor::from_vec(d_x, x.shape(), x.device()))
        .transpose()?;
    let d_factors = Tensor::from_vec(d_factors, factors.shape(), factors.device())?;
    Ok((d_x, Some(d_factors)))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};
    use candle_nn::Module;

    use super::{forward, DropoutDraw, LowRank};
    use crate::model::linear::Linear;
    use crate::model::tiny::{self, max_abs_diff, weighted_loss};

    fn var(shape: &[usize], seed: u64) -> Var {
        tiny::var(shape, seed, 1.0)
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
        let y = forward(&linear, &x, delta).unwrap();
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
        let weights = var(&[3, 100, n], 6).as_tensor().detach();
        let loss = |t: &Tensor| weighted_loss(t, &weights);
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
    fn joined_linears_match_separate_ones_with_their_deltas_side_by_side() {
        let linear = |seed: u64, n: usize| Linear {
            weight: var(&[n, 6], seed).as_tensor().detach(),
            bias: Some(var(&[n], seed + 1).as_tensor().detach()),
        };
        let (q, k, v) = (linear(1, 5), linear(3, 4), linear(5, 5));
        let factors = [
            (var(&[2, 6], 7), var(&[5, 2], 8)),
            (var(&[3, 6], 9), var(&[5, 3], 10)),
        ];
        let draws = [
            DropoutDraw { p: 0.2, seed: 1 },
            DropoutDraw { p: 0.2, seed: 2 },
        ];
        let low_rank = |i: usize| LowRank {
            a: factors[i].0.as_tensor().clone(),
            b: factors[i].1.as_tensor().clone(),
            scale: 1.5,
            dropout: Some(draws[i]),
        };
        let x = var(&[2, 150, 6], 11);
        let joined = super::forward_joined(
            vec![(&q, Some(low_rank(0))), (&k, None), (&v, Some(low_rank(1)))],
            x.as_tensor(),
        )
        .unwrap();
        let separate = Tensor::cat(
            &[
                forward(&q, x.as_tensor(), low_rank(0)).unwrap(),
                k.forward(x.as_tensor()).unwrap(),
                forward(&v, x.as_tensor(), low_rank(1)).unwrap(),
            ],
            2,
        )
        .unwrap();
        assert_eq!(joined.dims(), &[2, 150, 14]);
        assert!(max_abs_diff(&joined, &separate) < 1e-4, "outputs differ");
        let weights = var(&[2, 150, 14], 12).as_tensor().detach();
        let loss = |t: &Tensor| weighted_loss(t, &weights);
        let (g, g_ref) = (loss(&joined), loss(&separate));
        let mut tensors = vec![x.as_tensor()];
        tensors.extend(
            factors
                .iter()
                .flat_map(|(a, b)| [a.as_tensor(), b.as_tensor()]),
        );
        for t in tensors {
            let (got, want) = (g.get(t).unwrap(), g_ref.get(t).unwrap());
            assert!(max_abs_diff(got, want) < 1e-3, "gradients differ");
        }
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
