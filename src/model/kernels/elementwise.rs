//! Elementwise and row-wise kernels: `exp` and `erf` approximations, GELU, LayerNorm with a fused residual,
//! softmax, and their backward passes.

use rayon::prelude::*;

use super::*;

/// `e^x` for `x` in roughly [-87, 88], relative error below 2e-7, written to vectorise.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and removing 1.5·2²³ rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor series of e^r on |r| ≤ ln2/2, Horner form.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2ⁿ built from bits: n + 127 + ROUND holds the biased exponent n + 127 (1..=254 after the clamp) in
    // its low mantissa bits. A float-to-int cast would keep the loops that call this from vectorising, and
    // so would an overflow check on the subtraction (debug and test builds): it cannot overflow, so wrapping.
    let scale = f32::from_bits((n + 127.0 + ROUND).to_bits().wrapping_sub(ROUND.to_bits()) << 23);
    p * scale
}

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), written to vectorise.
#[inline(always)]
pub fn fast_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A1 + t * (A2 + t * (A3 + t * (A4 + t * A5))));
    let y = 1.0 - poly * fast_exp(-a * a);
    y.copysign(x)
}

/// In-place exact (erf) GELU, as BERT's `hidden_act = "gelu"`.
pub fn gelu_inplace(xs: &mut [f32]) {
    if xs.len() >= PARALLEL_ELEMENTS {
        xs.par_chunks_mut(ELEMENTS_PER_TASK).for_each(gelu_chunk);
    } else {
        gelu_chunk(xs);
    }
}

#[inline(always)]
pub(super) fn gelu_body(chunk: &mut [f32]) {
    for v in chunk.iter_mut() {
        let x = *v;
        *v = 0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

simd_dispatch!(gelu_chunk, gelu_chunk_avx2, gelu_body, (chunk: &mut [f32]));

/// `grad *= GELU'(x)` elementwise, for the exact (erf) GELU: the backward pass of [`gelu_inplace`].
pub fn gelu_backward(x: &[f32], grad: &mut [f32]) {
    assert_eq!(x.len(), grad.len(), "gelu_backward: shapes differ");
    split_paired(grad, x, ELEMENTS_PER_TASK, |g, x| gelu_backward_chunk(x, g));
}

#[inline(always)]
pub(super) fn gelu_backward_body(x: &[f32], grad: &mut [f32]) {
    // 1/√(2π): the standard normal density's constant.
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for (g, &x) in grad.iter_mut().zip(x) {
        let cdf = 0.5 * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = INV_SQRT_2PI * fast_exp(-0.5 * x * x);
        *g *= cdf + x * pdf;
    }
}

simd_dispatch!(
    gelu_backward_chunk,
    gelu_backward_chunk_avx2,
    gelu_backward_body,
    (x: &[f32], grad: &mut [f32])
);

/// In-place GELU that also writes `derivative = GELU'(x)`, elementwise in one pass, for the exact (erf)
/// GELU: the forward pass of a GELU whose backward pass is then [`mul_inplace`] (the erf and exp are
/// evaluated once, not again in the backward pass).
pub fn gelu_with_derivative(xs: &mut [f32], derivative: &mut [f32]) {
    assert_eq!(
        xs.len(),
        derivative.len(),
        "gelu_with_derivative: shapes differ"
    );
    if xs.len() >= PARALLEL_ELEMENTS {
        xs.par_chunks_mut(ELEMENTS_PER_TASK)
            .zip(derivative.par_chunks_mut(ELEMENTS_PER_TASK))
            .for_each(|(x, d)| gelu_with_derivative_chunk(x, d));
    } else {
        gelu_with_derivative_chunk(xs, derivative);
    }
}

#[inline(always)]
pub(super) fn gelu_with_derivative_body(xs: &mut [f32], derivative: &mut [f32]) {
    // 1/√(2π): the standard normal density's constant.
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for (v, d) in xs.iter_mut().zip(derivative.iter_mut()) {
        let x = *v;
        let cdf = 0.5 * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2));
        *v = x * cdf;
        *d = cdf + x * INV_SQRT_2PI * fast_exp(-0.5 * x * x);
    }
}

simd_dispatch!(
    gelu_with_derivative_chunk,
    gelu_with_derivative_chunk_avx2,
    gelu_with_derivative_body,
    (xs: &mut [f32], derivative: &mut [f32])
);

/// `values *= by` elementwise.
pub fn mul_inplace(values: &mut [f32], by: &[f32]) {
    assert_eq!(values.len(), by.len(), "mul_inplace: shapes differ");
    split_paired(values, by, ELEMENTS_PER_TASK, |v, b| {
        v.iter_mut().zip(b).for_each(|(v, b)| *v *= b)
    });
}

/// In-place `x = LayerNorm(x + residual)` over rows of width `gamma.len()`.
pub fn add_layer_norm_inplace(
    x: &mut [f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    let width = gamma.len();
    assert_eq!(
        x.len() % width,
        0,
        "layer_norm: input is not a whole number of rows"
    );
    if let Some(r) = residual {
        assert_eq!(r.len(), x.len(), "layer_norm: residual shape differs");
    }
    let rows = x.len() / width;
    let run = |xc: &mut [f32], rc: Option<&[f32]>| {
        for (i, row) in xc.chunks_exact_mut(width).enumerate() {
            norm_row(
                row,
                rc.map(|r| &r[i * width..(i + 1) * width]),
                gamma,
                beta,
                eps,
            );
        }
    };
    let chunk = ROWS_PER_TASK * width;
    match residual {
        Some(res) if rows > ROWS_PER_TASK => x
            .par_chunks_mut(chunk)
            .zip(res.par_chunks(chunk))
            .for_each(|(xc, rc)| run(xc, Some(rc))),
        None if rows > ROWS_PER_TASK => x.par_chunks_mut(chunk).for_each(|xc| run(xc, None)),
        _ => run(x, residual),
    }
}

/// Sum of a slice in eight independent lanes, so the loop vectorises (a strict left-to-right float sum
/// cannot).
#[inline(always)]
pub(super) fn lane_sum(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// A row's mean and `1/√(var + eps)`.
#[inline(always)]
pub(super) fn mean_and_inv_std(row: &[f32], eps: f32) -> (f32, f32) {
    let width = row.len() as f32;
    let mean = lane_sum(row) / width;
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += (v - mean) * (v - mean);
        }
    }
    let var = (lanes.iter().sum::<f32>()
        + chunks
            .remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum::<f32>())
        / width;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
pub(super) fn norm_row_body(
    row: &mut [f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    if let Some(res) = residual {
        for (v, r) in row.iter_mut().zip(res) {
            *v += r;
        }
    }
    let (mean, inv) = mean_and_inv_std(row, eps);
    for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inv * g + b;
    }
}

simd_dispatch!(
    norm_row,
    norm_row_avx2,
    norm_row_body,
    (row: &mut [f32], residual: Option<&[f32]>, gamma: &[f32], beta: &[f32], eps: f32)
);

/// The backward pass of a row LayerNorm `y = (x − μ)/σ · γ + β` (`σ = √(var + eps)`) over rows of width
/// `gamma.len()`: writes the input gradient into `grad` (which holds `∂L/∂y` on entry) and adds the scale's
/// and shift's gradients into `d_gamma` and `d_beta`. Mean and σ are recomputed from `x`: two cheap passes
/// instead of keeping a normalised copy of every activation alive until the backward pass.
pub fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    eps: f32,
    grad: &mut [f32],
    d_gamma: &mut [f32],
    d_beta: &mut [f32],
) {
    let width = gamma.len();
    assert!(
        width > 0 && x.len() == grad.len() && x.len().is_multiple_of(width),
        "layer_norm_backward: shapes differ"
    );
    assert!(d_gamma.len() == width && d_beta.len() == width);
    layer_norm_backward_rows(x, gamma, eps, grad, d_gamma, d_beta);
}

/// The input gradient alone of a row LayerNorm whose scale and shift are frozen: [`layer_norm_backward`]
/// without the parameters' gradients, split over rayon's pool by whole rows.
pub fn layer_norm_input_gradient(x: &[f32], gamma: &[f32], eps: f32, grad: &mut [f32]) {
    let width = gamma.len();
    assert!(
        width > 0 && x.len() == grad.len() && x.len().is_multiple_of(width),
        "layer_norm_input_gradient: shapes differ"
    );
    split_paired(grad, x, whole_rows(width), |grad, x| {
        let mut discarded = vec![0f32; 2 * width];
        let (d_gamma, d_beta) = discarded.split_at_mut(width);
        layer_norm_backward_rows(x, gamma, eps, grad, d_gamma, d_beta);
    });
}

#[inline(always)]
pub(super) fn layer_norm_backward_body(
    x: &[f32],
    gamma: &[f32],
    eps: f32,
    grad: &mut [f32],
    d_gamma: &mut [f32],
    d_beta: &mut [f32],
) {
    let width = gamma.len();
    let n = width as f32;
    for (x, g) in x.chunks_exact(width).zip(grad.chunks_exact_mut(width)) {
        let (mean, inv) = mean_and_inv_std(x, eps);
        // Σ γ·dy and Σ γ·dy·x̂ over the row, in eight lanes so the loop vectorises.
        let (mut lanes_a, mut lanes_b) = ([0f32; 8], [0f32; 8]);
        let (mut a, mut b) = (0f32, 0f32);
        let whole = width - width % 8;
        for ((xc, gc), mc) in x[..whole]
            .chunks_exact(8)
            .zip(g[..whole].chunks_exact(8))
            .zip(gamma[..whole].chunks_exact(8))
        {
            for l in 0..8 {
                let gy = mc[l] * gc[l];
                lanes_a[l] += gy;
                lanes_b[l] += gy * (xc[l] - mean) * inv;
            }
        }
        for j in whole..width {
            let gy = gamma[j] * g[j];
            a += gy;
            b += gy * (x[j] - mean) * inv;
        }
        a += lanes_a.iter().sum::<f32>();
        b += lanes_b.iter().sum::<f32>();
        let (a, b) = (a / n, b / n);
        for ((((&xv, dy), &gm), dg), db) in x
            .iter()
            .zip(g.iter_mut())
            .zip(gamma)
            .zip(d_gamma.iter_mut())
            .zip(d_beta.iter_mut())
        {
            let xhat = (xv - mean) * inv;
            *dg += *dy * xhat;
            *db += *dy;
            *dy = inv * (gm * *dy - a - xhat * b);
        }
    }
}

simd_dispatch!(
    layer_norm_backward_rows,
    layer_norm_backward_rows_avx2,
    layer_norm_backward_body,
    (x: &[f32], gamma: &[f32], eps: f32, grad: &mut [f32], d_gamma: &mut [f32], d_beta: &mut [f32])
);

/// In-place softmax of each row of `scores` (`[rows × width]`).
#[inline(always)]
pub(super) fn softmax_rows_body(scores: &mut [f32], width: usize) {
    for row in scores.chunks_exact_mut(width) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for v in row.iter_mut() {
            *v = fast_exp(*v - max);
        }
        let inv = 1.0 / lane_sum(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

simd_dispatch!(softmax_rows, softmax_rows_avx2, softmax_rows_body, (scores: &mut [f32], width: usize));

/// In-place softmax of each row of `x` (`[rows × width]`).
pub fn softmax_inplace(x: &mut [f32], width: usize) {
    assert_eq!(
        x.len() % width.max(1),
        0,
        "softmax: input is not whole rows"
    );
    if x.len() >= PARALLEL_ELEMENTS {
        x.par_chunks_mut(whole_rows(width))
            .for_each(|rows| softmax_rows(rows, width));
    } else {
        softmax_rows(x, width);
    }
}

/// `grad = p ⊙ (grad − Σ grad ⊙ p)` per row of width `width`: the backward pass of a row softmax whose
/// output was `p`.
pub fn softmax_backward(p: &[f32], grad: &mut [f32], width: usize) {
    assert_eq!(p.len(), grad.len(), "softmax_backward: shapes differ");
    assert_eq!(
        p.len() % width.max(1),
        0,
        "softmax_backward: input is not whole rows"
    );
    split_paired(grad, p, whole_rows(width), |g, p| {
        softmax_backward_rows(p, g, width)
    });
}

#[inline(always)]
pub(super) fn softmax_backward_body(p: &[f32], grad: &mut [f32], width: usize) {
    for (g, p) in grad.chunks_exact_mut(width).zip(p.chunks_exact(width)) {
        let dot: f32 = g.iter().zip(p).map(|(g, p)| g * p).sum();
        for (g, p) in g.iter_mut().zip(p) {
            *g = p * (*g - dot);
        }
    }
}

simd_dispatch!(
    softmax_backward_rows,
    softmax_backward_rows_avx2,
    softmax_backward_body,
    (p: &[f32], grad: &mut [f32], width: usize)
);
