//! `Linear`: the dense layer every projection of the encoder is built on.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Module, Shape, Storage, Tensor,
};
use candle_nn::VarBuilder;

use super::error::Result;
use super::kernels;

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
        let cpu =
            x.device().is_cpu() && x.dtype() == DType::F32 && self.weight.dtype() == DType::F32;
        let frozen =
            !self.weight.is_variable() && self.bias.as_ref().is_none_or(|b| !b.is_variable());
        match (&self.bias, cpu, frozen) {
            (_, true, true) => return x.contiguous()?.apply_op1(FrozenLinear(self.clone())),
            (Some(bias), true, false) => {
                return x
                    .contiguous()?
                    .apply_op3(&self.weight, bias, TrainableLinear)
            }
            _ => {}
        }
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x·Wᵀ + b` for a weight and bias that train (full fine-tuning): the forward pass of [`FrozenLinear`], and
/// a backward pass of three plain products (input gradient `g·W`, weight gradient `gᵀ·x`, bias gradient
/// `Σ g`) instead of candle's matmul backward through a batch of broadcast copies of `W`.
struct TrainableLinear;

/// The weight and bias gradients of a [`TrainableLinear`], flat: `out × in` values of the weight's, then the
/// `out` of the bias's.
struct TrainableLinearGrads;

impl CustomOp3 for TrainableLinear {
    fn name(&self) -> &'static str {
        "trainable-linear"
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
        let (n, k) = l2.shape().dims2()?;
        let w = f32_slice(s2, l2, "trainable-linear weight")?;
        let b = f32_slice(s3, l3, "trainable-linear bias")?;
        let (out, shape) = forward_rows((s1, l1), w, Some(b), (n, k), "trainable-linear input")?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (n, k) = weight.dims2()?;
        let d_x = grad.apply_op1_no_bwd(&FrozenLinearBackward {
            weight: weight.detach(),
        })?;
        let both = x.apply_op2_no_bwd(&grad, &TrainableLinearGrads)?;
        let d_w = both.narrow(0, 0, n * k)?.reshape((n, k))?;
        let d_b = both.narrow(0, n * k, n)?;
        Ok((Some(d_x), Some(d_w), Some(d_b)))
    }
}

impl CustomOp2 for TrainableLinearGrads {
    fn name(&self) -> &'static str {
        "trainable-linear-grads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let k = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let n = l2.shape().dims().last().copied().unwrap_or(1).max(1);
        let x = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        let rows = x.len() / k;
        if g.len() != rows * n {
            return Err(candle_core::Error::Msg(format!(
                "{}: input {:?} and gradient {:?} disagree",
                self.name(),
                l1.shape(),
                l2.shape()
            )));
        }
        crate::pressure::yield_point();
        let mut out = vec![0f32; n * k + n];
        let (d_w, d_b) = out.split_at_mut(n * k);
        kernels::weight_gradient(g, x, rows, n, k, d_w, d_b);
        Ok((CpuStorage::F32(out), Shape::from(n * k + n)))
    }
}

/// `x·Wᵀ + b` for a weight and bias that do not train, whose backward computes only the input's gradient.
/// Candle's matmul backward also computes the weight's gradient (a third of a linear's training cost)
/// whether or not the weight is a variable; LoRA training through frozen linears would pay it for nothing.
///
/// Both directions run in blocks of [`CHUNK_ROWS`] rows with a [`crate::pressure::yield_point`] before
/// each, so a trainer sharing the cores with serving steps aside within milliseconds.
struct FrozenLinear(Linear);

/// The input gradient `g·W` of a [`FrozenLinear`].
struct FrozenLinearBackward {
    weight: Tensor,
}

/// Rows per block of a frozen linear: a few milliseconds of GEMM on one core at BERT-small widths.
const CHUNK_ROWS: usize = 256;

/// The contiguous f32 values of a tensor's storage, which must be on the CPU.
pub(crate) fn cpu_f32<'a>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => f32_slice(cpu, layout, what),
        _ => Err(candle_core::Error::Msg(format!("{what} is not on the CPU"))),
    }
}

/// Runs `block(rows, input, output)` over blocks of [`CHUNK_ROWS`] rows of an `[rows × k]` input and an
/// `[rows × n]` output, yielding to serving before each.
fn by_blocks(
    x: &[f32],
    k: usize,
    n: usize,
    mut block: impl FnMut(usize, &[f32], &mut [f32]),
) -> Vec<f32> {
    let rows = x.len() / k.max(1);
    let mut out = vec![0f32; rows * n];
    for (x, out) in x
        .chunks(CHUNK_ROWS * k.max(1))
        .zip(out.chunks_mut(CHUNK_ROWS * n.max(1)))
    {
        crate::pressure::yield_point();
        block(x.len() / k.max(1), x, out);
    }
    out
}

/// `dims` with its last entry replaced by `last`.
pub(crate) fn with_last(dims: &[usize], last: usize) -> Shape {
    let mut shape = dims.to_vec();
    if let Some(l) = shape.last_mut() {
        *l = last;
    }
    Shape::from(shape)
}

/// The contiguous f32 values of a CPU storage; `what` names it in the error (e.g. "frozen-linear input").
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => Err(candle_core::Error::Msg(format!(
            "{what} is not a contiguous f32 tensor"
        ))),
    }
}

/// `x·Wᵀ + b` for an `x` ending in `k` and a `w` of `[n × k]`, in blocks of rows: the forward pass of both
/// linear ops.
fn forward_rows(
    (storage, layout): (&CpuStorage, &Layout),
    w: &[f32],
    bias: Option<&[f32]>,
    (n, k): (usize, usize),
    what: &str,
) -> candle_core::Result<(Vec<f32>, Shape)> {
    let dims = ending_in(layout, k, what)?;
    let x = f32_slice(storage, layout, what)?;
    Ok((linear_by_blocks(x, w, bias, (n, k))?, with_last(dims, n)))
}

/// `x·Wᵀ + b` for `x` of `rows × k` values and a `w` of `[n × k]`, in blocks of [`CHUNK_ROWS`] rows with a
/// yield point before each. The output starts as the bias and the products add onto it: one pass over it,
/// not a zeroing and a copy of the bias. Where [`kernels::packing_pays`], the blocks read `w` packed for the
/// AVX-512 kernel, once per call: the weights of a training step are new or joined anew every call.
fn linear_by_blocks(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    (n, k): (usize, usize),
) -> candle_core::Result<Vec<f32>> {
    if !x.len().is_multiple_of(k.max(1)) || bias.is_some_and(|b| b.len() != n) {
        return Err(candle_core::Error::Msg(format!(
            "linear: an input of {} values is not rows of {k}, or the bias is not {n} values",
            x.len()
        )));
    }
    let rows = x.len() / k.max(1);
    let mut out = match bias {
        Some(bias) => bias.repeat(rows),
        None => vec![0f32; rows * n],
    };
    let packed = if kernels::packing_pays(rows, n) {
        kernels::PackedWeight::new(w, n, k)
    } else {
        None
    };
    for (x, out) in x
        .chunks(CHUNK_ROWS * k.max(1))
        .zip(out.chunks_mut(CHUNK_ROWS * n.max(1)))
    {
        crate::pressure::yield_point();
        let rows = x.len() / k.max(1);
        match &packed {
            Some(w) => kernels::add_packed_linear(x, rows, w, out),
            None => kernels::add_linear_into(x, rows, k, w, 1.0, out, kernels::Columns::all(n)),
        }
    }
    Ok(out)
}

/// `linear(x)` for a frozen CPU f32 `linear` and `x` of `rows × in` values, in blocks of rows: the frozen
/// product of [`FrozenLinear`], of the fused LoRA op ([`super::train::lora_linear`]) and of the fused encoder
/// layer ([`super::train::encoder_layer`]).
pub(crate) fn frozen_product(linear: &Linear, x: &[f32]) -> candle_core::Result<Vec<f32>> {
    let (w_storage, w_layout) = linear.weight.storage_and_layout();
    let w = cpu_f32(&w_storage, w_layout, "frozen-linear weight")?;
    let bias_guard = linear.bias.as_ref().map(|b| b.storage_and_layout());
    let bias = match &bias_guard {
        Some((storage, layout)) => Some(cpu_f32(storage, layout, "frozen-linear bias")?),
        None => None,
    };
    linear_by_blocks(x, w, bias, linear.weight.dims2()?)
}

/// `g·W` for a gradient `g` of `rows × out` and a frozen CPU f32 `weight` `[out × in]`, in blocks of rows:
/// the input gradient of [`FrozenLinear`], of the fused LoRA op and of the fused encoder layer.
pub(crate) fn frozen_input_gradient(weight: &Tensor, g: &[f32]) -> candle_core::Result<Vec<f32>> {
    let (n, k) = weight.dims2()?;
    if !g.len().is_multiple_of(n.max(1)) {
        return Err(candle_core::Error::Msg(format!(
            "frozen-linear gradient of {} values is not rows of {n}",
            g.len()
        )));
    }
    let (w_storage, w_layout) = weight.storage_and_layout();
    let w = cpu_f32(&w_storage, w_layout, "frozen-linear weight")?;
    Ok(by_blocks(g, n, k, |rows, g, out| {
        kernels::matmul(g, rows, n, w, k, out)
    }))
}

/// The dims of an op's input, checked to end in `width`.
pub(crate) fn ending_in<'a>(
    layout: &'a Layout,
    width: usize,
    what: &str,
) -> candle_core::Result<&'a [usize]> {
    let dims = layout.shape().dims();
    if dims.last() != Some(&width) {
        return Err(candle_core::Error::Msg(format!(
            "{what} {dims:?} does not end in {width}"
        )));
    }
    Ok(dims)
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.weight.dims2()?;
        let what = "frozen-linear input";
        let dims = ending_in(layout, k, what)?;
        let out = frozen_product(&self.0, f32_slice(storage, layout, what)?)?;
        Ok((CpuStorage::F32(out), with_last(dims, n)))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let backward = FrozenLinearBackward {
            weight: self.0.weight.clone(),
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(backward)?))
    }
}

impl CustomOp1 for FrozenLinearBackward {
    fn name(&self) -> &'static str {
        "frozen-linear-backward"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = self.weight.dims2()?;
        let dims = ending_in(layout, n, "frozen-linear gradient")?;
        let g = f32_slice(storage, layout, "frozen-linear gradient")?;
        let out = frozen_input_gradient(&self.weight, g)?;
        Ok((CpuStorage::F32(out), with_last(dims, k)))
    }
}

/// LayerNorm over the last dimension, as one op with its own backward pass (candle's fused `layer_norm`
/// records none).
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
        super::train::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};
    use candle_nn::Module;

    use super::Linear;
    use crate::model::tiny::max_abs_diff;

    #[test]
    fn a_frozen_linear_computes_the_same_output_and_input_gradient_as_a_matmul() {
        let dev = Device::Cpu;
        let values = |n: usize, seed: u64| crate::rng::Rng::new(seed).uniform(n, 1.0);
        // 40 outputs: a full and a masked AVX-512 tile where the CPU has it.
        let weight = Tensor::from_vec(values(40 * 24, 1), (40, 24), &dev).unwrap();
        let bias = Tensor::from_vec(values(40, 2), 40, &dev).unwrap();
        // More rows than one block, so the blocked and packed-weight paths are covered.
        let x = Var::from_tensor(
            &Tensor::from_vec(values(3 * 100 * 24, 3), (3, 100, 24), &dev).unwrap(),
        )
        .unwrap();
        let frozen = Linear {
            weight: weight.clone(),
            bias: Some(bias.clone()),
        };
        let y = frozen.forward(x.as_tensor()).unwrap();
        let reference = x
            .as_tensor()
            .broadcast_matmul(&weight.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        assert_eq!(y.dims(), &[3, 100, 40]);
        assert!(max_abs_diff(&y, &reference) < 1e-4);
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = reference
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            g.get(x.as_tensor()).unwrap(),
            g_ref.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(a, b) < 1e-4, "input gradients differ");
        assert!(
            g.get(&weight).is_none(),
            "no gradient for the frozen weight"
        );
    }

    #[test]
    fn a_trainable_linear_computes_the_same_output_and_all_three_gradients_as_a_matmul() {
        let dev = Device::Cpu;
        let var = |shape: &[usize], seed: u64| {
            let n = shape.iter().product();
            let t = Tensor::from_vec(crate::rng::Rng::new(seed).uniform(n, 1.0), shape, &dev);
            Var::from_tensor(&t.unwrap()).unwrap()
        };
        // Wider out than in (as BERT's intermediate linear), more rows than one block.
        let (weight, bias, x) = (var(&[7, 3], 1), var(&[7], 2), var(&[3, 100, 3], 3));
        let linear = Linear {
            weight: weight.as_tensor().clone(),
            bias: Some(bias.as_tensor().clone()),
        };
        let y = linear.forward(x.as_tensor()).unwrap();
        let reference = x
            .as_tensor()
            .broadcast_matmul(&weight.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(bias.as_tensor())
            .unwrap();
        assert_eq!(y.dims(), &[3, 100, 7]);
        assert!(max_abs_diff(&y, &reference) < 1e-5);
        let loss = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (g, g_ref) = (loss(&y), loss(&reference));
        for (name, v) in [("input", &x), ("weight", &weight), ("bias", &bias)] {
            let (a, b) = (
                g.get(v.as_tensor()).unwrap(),
                g_ref.get(v.as_tensor()).unwrap(),
            );
            assert_eq!(a.dims(), b.dims(), "{name} gradient shape");
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                max_abs_diff(a, b) < 1e-5 * scale.max(1.0),
                "{name} gradients differ"
            );
        }
    }
}
