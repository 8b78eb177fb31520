//! GELU and the attention softmax for the trainable candle path, as single ops with hand-written backward
//! passes on the vectorised kernels. Candle's own `gelu_erf` backward runs a scalar erf, and a softmax
//! composed of differentiable ops (its fused one has no backward) costs five elementwise passes each way;
//! both were long stretches in which the trainer could not step aside for serving. These run in blocks with
//! a [`crate::pressure::yield_point`] before each. Other devices and dtypes take candle's ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};

use super::kernels;
use super::linear::f32_slice;
use crate::pressure::yield_point;

/// Elements per block between yield points: well under a millisecond of work.
const BLOCK: usize = 1 << 16;

fn on_cpu_f32(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Exact (erf) GELU, `x·Φ(x)`.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if !on_cpu_f32(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    if !on_cpu_f32(x) {
        let max = x.max_keepdim(D::Minus1)?;
        let e = x.broadcast_sub(&max)?.exp()?;
        return e.broadcast_div(&e.sum_keepdim(D::Minus1)?);
    }
    x.contiguous()?.apply_op1(Softmax)
}

/// A backward op's output: `grad` (the second input) updated in place by `kernel(saved, grad)` over blocks of
/// `block` elements, yielding before each; `saved` is the first input (the forward's input or output).
fn backward_by_blocks(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    block: usize,
    what: &str,
    kernel: impl Fn(&[f32], &mut [f32]),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let saved = f32_slice(s1, l1, what)?;
    let mut grad = f32_slice(s2, l2, what)?.to_vec();
    for (g, s) in grad.chunks_mut(block).zip(saved.chunks(block)) {
        yield_point();
        kernel(s, g);
    }
    Ok((CpuStorage::F32(grad), l2.shape().clone()))
}

struct Gelu;

struct GeluBackward;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = f32_slice(s, l, self.name())?.to_vec();
        for block in out.chunks_mut(BLOCK) {
            yield_point();
            kernels::gelu_inplace(block);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?,
        ))
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-erf-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        backward_by_blocks(
            (s1, l1),
            (s2, l2),
            BLOCK,
            self.name(),
            kernels::gelu_backward,
        )
    }
}

struct Softmax;

struct SoftmaxBackward {
    width: usize,
}

/// Whole rows of `width` per block.
fn rows_per_block(width: usize) -> usize {
    (BLOCK / width.max(1)).max(1) * width.max(1)
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let width = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = f32_slice(s, l, self.name())?.to_vec();
        for block in out.chunks_mut(rows_per_block(width)) {
            yield_point();
            kernels::softmax_inplace(block, width);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let width = res.dims().last().copied().unwrap_or(1);
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxBackward { width },
        )?))
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-last-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let width = self.width.max(1);
        backward_by_blocks(
            (s1, l1),
            (s2, l2),
            rows_per_block(width),
            self.name(),
            |p, g| kernels::softmax_backward(p, g, width),
        )
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var, D};

    use super::{gelu_erf, softmax_last};
    use crate::model::tiny::max_abs_diff;

    /// Values and input gradients of `ours` and `reference` under a weighted sum, on the same input.
    fn compare(
        ours: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        reference: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> (f32, f32) {
        let dev = Device::Cpu;
        // More than one block, with a last dimension that does not divide it.
        let shape = (3, 700, 37);
        let n = 3 * 700 * 37;
        let x = Var::from_tensor(
            &Tensor::from_vec(crate::rng::Rng::new(5).uniform(n, 4.0), shape, &dev).unwrap(),
        )
        .unwrap();
        let weights =
            Tensor::from_vec(crate::rng::Rng::new(6).uniform(n, 1.0), shape, &dev).unwrap();
        let run = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
            let y = f(x.as_tensor()).unwrap();
            let grads = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (y, grads.get(x.as_tensor()).unwrap().clone())
        };
        let (y1, g1) = run(&ours);
        let (y2, g2) = run(&reference);
        (max_abs_diff(&y1, &y2), max_abs_diff(&g1, &g2))
    }

    #[test]
    fn gelu_matches_candles_in_value_and_gradient() {
        let (value, gradient) = compare(gelu_erf, |x| x.gelu_erf());
        assert!(value < 1e-5, "values differ by {value}");
        assert!(gradient < 1e-5, "gradients differ by {gradient}");
    }

    #[test]
    fn softmax_matches_the_composed_ops_in_value_and_gradient() {
        let composed = |x: &Tensor| {
            let max = x.max_keepdim(D::Minus1)?;
            let e = x.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        };
        let (value, gradient) = compare(softmax_last, composed);
        assert!(value < 1e-6, "values differ by {value}");
        assert!(gradient < 1e-6, "gradients differ by {gradient}");
    }
}
