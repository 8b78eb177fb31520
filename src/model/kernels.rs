//! Plain-slice f32 kernels for the CPU serving path: GEMM with a fused bias, GELU, LayerNorm with a fused
//! residual, softmax and attention over packed (unpadded) sequences.
//!
//! The loops are written so that the compiler vectorises them (no libm calls inside): `exp` and `erf` are
//! polynomial approximations accurate to ~1e-7, far below the 1e-4 parity budget against PyTorch.

use gemm::Parallelism;
use rayon::prelude::*;

pub use super::avx512::PackedWeight;

/// Work (multiply-adds) below which a GEMM runs on the calling thread: splitting it costs more than it saves.
const PARALLEL_GEMM_MIN_WORK: usize = 1 << 20;
/// Rows per rayon task for the row-wise kernels.
const ROWS_PER_TASK: usize = 16;
/// Elements from which the elementwise kernels split across rayon's pool, and the size of each task.
#[cfg(not(miri))]
pub(crate) const PARALLEL_ELEMENTS: usize = 1 << 16;
// Under Miri (a thousand times slower) the tests still reach the parallel paths with small inputs.
#[cfg(miri)]
pub(crate) const PARALLEL_ELEMENTS: usize = 1 << 9;
pub(crate) const ELEMENTS_PER_TASK: usize = 1 << 14;

/// Runs `kernel(values, other)` over matching chunks of `chunk` elements of two buffers of one length,
/// across rayon's pool once they reach [`PARALLEL_ELEMENTS`], otherwise on the calling thread in one go.
fn split_paired(
    values: &mut [f32],
    other: &[f32],
    chunk: usize,
    kernel: impl Fn(&mut [f32], &[f32]) + Sync + Send,
) {
    if values.len() >= PARALLEL_ELEMENTS {
        values
            .par_chunks_mut(chunk)
            .zip(other.par_chunks(chunk))
            .for_each(|(v, o)| kernel(v, o));
    } else {
        kernel(values, other);
    }
}

/// A task's share of a row-wise kernel: whole rows of `width`, about [`ELEMENTS_PER_TASK`] elements.
fn whole_rows(width: usize) -> usize {
    (ELEMENTS_PER_TASK / width.max(1)).max(1) * width.max(1)
}

/// Defines `$name`, which runs `$body` compiled for AVX2 when the CPU has it (checked once at run time)
/// and for the build's baseline otherwise. The same source either way, so results agree.
macro_rules! simd_dispatch {
    ($name:ident, $avx2:ident, $body:ident, ($($arg:ident : $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        // Safe to call only where the CPU has AVX2; `$body` itself is safe code.
        unsafe fn $avx2($($arg: $ty),*) {
            $body($($arg),*)
        }

        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the CPU supports AVX2 (checked at run time).
                return unsafe { $avx2($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
}

/// A pointer that may cross threads; each task writes a disjoint region through it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to write disjoint regions from rayon tasks that all end before the owner is read.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send` above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    // A method (not field access) so closures capture the whole `Send` wrapper, not the raw pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Number of threads the heavy kernels may use (rayon's pool, which candle also uses).
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

fn parallelism(work: usize) -> Parallelism {
    let threads = threads();
    if threads > 1 && work >= PARALLEL_GEMM_MIN_WORK {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `a · b`, panicking on overflow: these sizes guard unsafe GEMM calls, so they must not wrap.
fn size(a: usize, b: usize) -> usize {
    a.checked_mul(b).expect("kernel size overflows usize")
}

/// How a row-major weight `w` enters a product.
#[derive(Clone, Copy)]
enum Weight {
    /// `w` is `[cols × inner]` (PyTorch's `Linear` layout) and the product uses `wᵀ`.
    Transposed,
    /// `w` is `[inner × cols]` and the product uses it as it is.
    AsIs,
}

/// `out[rows × cols] = (accumulate ? out : 0) + scale · a[rows × inner] · W`, with `W` read from `w` as
/// `layout` says: the bounds-checked form of [`strided_product`] for whole row-major buffers.
#[allow(clippy::too_many_arguments)]
fn product(
    what: &str,
    a: &[f32],
    rows: usize,
    inner: usize,
    w: &[f32],
    layout: Weight,
    cols: usize,
    accumulate: bool,
    scale: f32,
    out: &mut [f32],
) {
    assert_eq!(
        a.len(),
        size(rows, inner),
        "{what}: input is not rows × {inner}"
    );
    assert_eq!(
        w.len(),
        size(inner, cols),
        "{what}: weight is not {cols} × {inner}"
    );
    assert_eq!(
        out.len(),
        size(rows, cols),
        "{what}: output is not rows × {cols}"
    );
    if rows == 0 {
        return;
    }
    let (w_rs, w_cs) = match layout {
        Weight::Transposed => (1, inner),
        Weight::AsIs => (cols, 1),
    };
    // SAFETY: the asserts above bound every access gemm makes with these sizes and strides: `a` and `out`
    // are row-major `rows × inner` and `rows × cols`, and either layout of `w` stays within `inner · cols`.
    unsafe {
        strided_product(
            (rows, cols, inner),
            (out.as_mut_ptr(), cols, accumulate),
            (a.as_ptr(), inner, 1),
            (w.as_ptr(), w_rs, w_cs),
            scale,
            parallelism(rows.saturating_mul(cols).saturating_mul(inner)),
        );
    }
}

/// `out[rows × n] = x[rows × k] · wᵀ + bias`, where `w` is `[n × k]` row-major (PyTorch's `Linear` layout).
///
/// `out` is overwritten; its previous contents are ignored.
pub fn linear(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(out.len(), size(rows, n), "linear: output is not rows × n");
    let with_bias = start_from_bias("linear", out, bias, n);
    product(
        "linear",
        x,
        rows,
        k,
        w,
        Weight::Transposed,
        n,
        with_bias,
        1.0,
        out,
    );
}

/// Writes `bias` into every row of `out` (rows of `n`); whether there was one to write (without one, `out`
/// is left for a product that overwrites it).
fn start_from_bias(what: &str, out: &mut [f32], bias: Option<&[f32]>, n: usize) -> bool {
    let Some(bias) = bias else {
        return false;
    };
    assert_eq!(bias.len(), n, "{what}: bias is not n");
    for row in out.chunks_exact_mut(n) {
        row.copy_from_slice(bias);
    }
    true
}

/// Columns `[start, start + width)` of a row-major buffer whose rows are `stride` wide: one linear's share of
/// the output of several linears computed side by side.
#[derive(Debug, Clone, Copy)]
pub struct Columns {
    /// First column.
    pub start: usize,
    /// Number of columns.
    pub width: usize,
    /// Width of the buffer's rows.
    pub stride: usize,
}

impl Columns {
    /// Every column of rows `width` wide.
    pub fn all(width: usize) -> Self {
        Self {
            start: 0,
            width,
            stride: width,
        }
    }

    /// Checks that the window fits `buffer` of `rows` rows; returns the window's first element.
    fn check(&self, what: &str, buffer: usize, rows: usize) -> usize {
        assert!(
            self.start
                .checked_add(self.width)
                .is_some_and(|end| end <= self.stride),
            "{what}: columns {self:?} exceed the rows"
        );
        assert_eq!(
            buffer,
            size(rows, self.stride),
            "{what}: buffer is not rows × {}",
            self.stride
        );
        self.start
    }
}

/// `out[:, cols] += scale · x[rows × k] · wᵀ` for a `w` of shape `[cols.width × k]` row-major: a low-rank
/// delta added onto its linear's columns of the output ([`Columns::all`]: onto the whole output).
pub fn add_linear_into(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    scale: f32,
    out: &mut [f32],
    cols: Columns,
) {
    let start = cols.check("add_linear_into", out.len(), rows);
    assert_eq!(x.len(), size(rows, k), "add_linear_into: x is not rows × k");
    assert_eq!(
        w.len(),
        size(cols.width, k),
        "add_linear_into: w is not width × k"
    );
    if rows == 0 {
        return;
    }
    // SAFETY: x is [rows × k], w [width × k] read transposed, and the output window's rows (start + width ≤
    // stride) lie inside out, [rows × stride], as asserted above.
    unsafe {
        strided_product(
            (rows, cols.width, k),
            (out.as_mut_ptr().add(start), cols.stride, true),
            (x.as_ptr(), k, 1),
            (w.as_ptr(), 1, k),
            scale,
            parallelism(size(size(rows, cols.width), k)),
        );
    }
}

/// `out[rows × k] = g[:, cols] · w` for a `w` of shape `[cols.width × k]` row-major: the gradient reaching a
/// low-rank delta's inner activations from its linear's columns of the output gradient.
pub fn matmul_from(g: &[f32], cols: Columns, rows: usize, w: &[f32], k: usize, out: &mut [f32]) {
    let start = cols.check("matmul_from", g.len(), rows);
    assert_eq!(
        w.len(),
        size(cols.width, k),
        "matmul_from: w is not width × k"
    );
    assert_eq!(out.len(), size(rows, k), "matmul_from: out is not rows × k");
    if rows == 0 {
        return;
    }
    // SAFETY: the window's rows lie inside g, [rows × stride]; w is [width × k] and out [rows × k], as
    // asserted above.
    unsafe {
        strided_product(
            (rows, k, cols.width),
            (out.as_mut_ptr(), k, false),
            (g.as_ptr().add(start), cols.stride, 1),
            (w.as_ptr(), k, 1),
            1.0,
            parallelism(size(size(rows, cols.width), k)),
        );
    }
}

/// `out[cols.width × k] = scale · g[:, cols]ᵀ · x[rows × k]`: a weight gradient summed over the rows.
pub fn transposed_product(
    g: &[f32],
    cols: Columns,
    x: &[f32],
    rows: usize,
    k: usize,
    scale: f32,
    out: &mut [f32],
) {
    let start = cols.check("transposed_product", g.len(), rows);
    assert_eq!(
        x.len(),
        size(rows, k),
        "transposed_product: x is not rows × k"
    );
    assert_eq!(
        out.len(),
        size(cols.width, k),
        "transposed_product: out is not width × k"
    );
    if rows == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: g's window is read as its transpose [width × rows] inside g, [rows × stride]; x is [rows × k]
    // and out [width × k], as asserted above.
    unsafe {
        strided_product(
            (cols.width, k, rows),
            (out.as_mut_ptr(), k, false),
            (g.as_ptr().add(start), 1, cols.stride),
            (x.as_ptr(), k, 1),
            scale,
            parallelism(size(size(cols.width, k), rows)),
        );
    }
}

/// Whether packing a linear's weight ([`PackedWeight::new`]) for one product of `rows` rows and `outputs`
/// columns pays for itself: on CPUs with AVX-512 (elsewhere nothing packs), for outputs wide enough to fill
/// its tiles, once the rows make the product a few times longer than the packing.
pub fn packing_pays(rows: usize, outputs: usize) -> bool {
    rows >= PACK_MIN_ROWS && outputs >= AVX512_MIN_COLS && super::avx512::available()
}

/// Rows from which packing a weight for one product pays: the break-even point measured ~120 rows at BERT-small
/// widths, and twice that leaves a margin for slower memory.
const PACK_MIN_ROWS: usize = 256;
/// Columns from which a product goes to the AVX-512 kernel: narrower ones (a LoRA rank, a 2-label head) fill
/// too little of its 32-column tile.
const AVX512_MIN_COLS: usize = 16;

/// `out[rows × n] = x[rows × k] · Wᵀ + bias` for a linear's weight `W` packed as [`PackedWeight`]: the packed
/// form of [`linear`].
pub fn packed_linear(
    x: &[f32],
    rows: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let n = w.dims().0;
    assert_eq!(
        out.len(),
        size(rows, n),
        "packed_linear: output is not rows × n"
    );
    if !start_from_bias("packed_linear", out, bias, n) {
        out.fill(0.0);
    }
    add_packed_linear(x, rows, w, out);
}

/// `out[rows × n] += x[rows × k] · Wᵀ` for a linear's weight `W` packed as [`PackedWeight`].
pub fn add_packed_linear(x: &[f32], rows: usize, w: &PackedWeight, out: &mut [f32]) {
    let (n, k) = w.dims();
    assert_eq!(
        x.len(),
        size(rows, k),
        "add_packed_linear: x is not rows × k"
    );
    assert_eq!(
        out.len(),
        size(rows, n),
        "add_packed_linear: out is not rows × n"
    );
    // SAFETY: a packed weight exists only where AVX-512 is available; its panels cover n × k, and x and out
    // are row-major [rows × k] and [rows × n], as asserted above.
    unsafe {
        avx512_product(
            (rows, n, k),
            (out.as_mut_ptr(), n, true),
            (x.as_ptr(), k, 1),
            w.panels(),
            1.0,
            parallelism(size(size(rows, n), k)),
        );
    }
}

/// `out[rows × k] += scale · g[rows × n] · w` for a `w` of shape `[n × k]` row-major: a low-rank delta's
/// share of an input gradient.
pub fn add_matmul(
    g: &[f32],
    rows: usize,
    n: usize,
    w: &[f32],
    k: usize,
    scale: f32,
    out: &mut [f32],
) {
    product(
        "add_matmul",
        g,
        rows,
        n,
        w,
        Weight::AsIs,
        k,
        true,
        scale,
        out,
    );
}

/// `out[rows × k] = g[rows × n] · w` for a `w` of shape `[n × k]` row-major: a linear layer's input gradient.
///
/// `out` is overwritten; its previous contents are ignored.
pub fn matmul(g: &[f32], rows: usize, n: usize, w: &[f32], k: usize, out: &mut [f32]) {
    product("matmul", g, rows, n, w, Weight::AsIs, k, false, 1.0, out);
}

/// `out[n × k] = gᵀ · x` for `g` `[rows × n]` and `x` `[rows × k]`: the weight gradient of a linear
/// `y = x·Wᵀ` whose output gradient is `g`. Column sums of `g` (the bias gradient) go to `bias_out`.
pub fn weight_gradient(
    g: &[f32],
    x: &[f32],
    rows: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    bias_out: &mut [f32],
) {
    assert_eq!(bias_out.len(), n, "weight_gradient: bias is not n");
    transposed_product(g, Columns::all(n), x, rows, k, 1.0, out);
    bias_out.fill(0.0);
    for row in g.chunks_exact(n.max(1)) {
        for (b, v) in bias_out.iter_mut().zip(row) {
            *b += v;
        }
    }
}

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
fn gelu_body(chunk: &mut [f32]) {
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
fn gelu_backward_body(x: &[f32], grad: &mut [f32]) {
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
fn gelu_with_derivative_body(xs: &mut [f32], derivative: &mut [f32]) {
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
fn lane_sum(xs: &[f32]) -> f32 {
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
fn mean_and_inv_std(row: &[f32], eps: f32) -> (f32, f32) {
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
fn norm_row_body(row: &mut [f32], residual: Option<&[f32]>, gamma: &[f32], beta: &[f32], eps: f32) {
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
fn layer_norm_backward_body(
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
fn softmax_rows_body(scores: &mut [f32], width: usize) {
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
fn softmax_backward_body(p: &[f32], grad: &mut [f32], width: usize) {
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

/// Scaled dot-product self-attention over packed sequences.
///
/// `q`, `k`, `v` and `out` are `[tokens × heads·head_dim]`; sequence `i` occupies rows
/// `offsets[i]..offsets[i + 1]`. No padding exists, so no mask is needed and no work is wasted.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    offsets: &[usize],
    heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    let hidden = size(heads, head_dim);
    let tokens = *offsets.last().unwrap_or(&0);
    assert!(
        offsets.first().is_none_or(|&o| o == 0) && offsets.windows(2).all(|w| w[0] <= w[1]),
        "attention: offsets must start at 0 and never decrease"
    );
    let longest = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    size(longest, longest);
    assert_eq!(
        q.len(),
        size(tokens, hidden),
        "attention: q is not tokens × hidden"
    );
    assert_eq!(k.len(), q.len(), "attention: k differs from q");
    assert_eq!(v.len(), q.len(), "attention: v differs from q");
    assert_eq!(out.len(), q.len(), "attention: out differs from q");
    let out_ptr = SendPtr(out.as_mut_ptr());
    let lengths: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    for_each_head(&lengths, heads, |s, h| {
        let len = lengths[s];
        let base = offsets[s] * hidden + h * head_dim;
        // SAFETY: (s, h) pairs are distinct, so each task reads its own q/k/v columns of its own rows and
        // writes a disjoint block of `out`; every index stays below tokens × hidden (asserted above).
        unsafe {
            let p = head_probabilities(
                q.as_ptr().add(base),
                k.as_ptr().add(base),
                hidden,
                len,
                head_dim,
            );
            strided_product(
                (len, head_dim, len),
                (out_ptr.get().add(base), hidden, false),
                (p.as_ptr(), len, 1),
                (v.as_ptr().add(base), hidden, 1),
                1.0,
                Parallelism::None,
            );
        }
    });
}

/// Runs `task(sequence, head)` for every head of every non-empty sequence (`lengths`), across rayon's pool
/// when there is more than one.
fn for_each_head(lengths: &[usize], heads: usize, task: impl Fn(usize, usize) + Sync) {
    let work: Vec<(usize, usize)> = (0..lengths.len())
        .filter(|&s| lengths[s] > 0)
        .flat_map(|s| (0..heads).map(move |h| (s, h)))
        .collect();
    if work.len() > 1 && threads() > 1 {
        work.par_iter().for_each(|&(s, h)| task(s, h));
    } else {
        work.iter().for_each(|&(s, h)| task(s, h));
    }
}

/// One head's attention probabilities `softmax(q·kᵀ / √head_dim)`, `[len × len]`, for `len` rows of queries
/// and keys starting at `q` and `k`, `stride` apart.
///
/// # Safety
/// `len` rows of `head_dim` values, `stride` apart, must be readable from `q` and from `k`.
unsafe fn head_probabilities(
    q: *const f32,
    k: *const f32,
    stride: usize,
    len: usize,
    head_dim: usize,
) -> Vec<f32> {
    let mut p = vec![0f32; len * len];
    // SAFETY: `p` is `len × len`; the caller guarantees `len` rows of `head_dim` values from `q` and `k`.
    unsafe {
        strided_product(
            (len, len, head_dim),
            (p.as_mut_ptr(), len, false),
            (q, stride, 1),
            (k, 1, stride),
            1.0 / (head_dim as f32).sqrt(),
            Parallelism::None,
        )
    };
    softmax_rows(&mut p, len);
    p
}

/// A strided product `dst = (accumulate ? dst : 0) + scale · a·b` (`[m × n]`, row stride `dst_rs`) of `a`
/// `[m × k]` and `b` `[k × n]`, each given by its row and column strides. The one place the kernels call
/// into gemm, or into the AVX-512 kernel for the products it covers.
///
/// # Safety
/// Every index the strides and sizes reach must lie inside the pointed-to buffers, and `dst` must not
/// overlap `a` or `b`.
unsafe fn strided_product(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, accumulate): (*mut f32, usize, bool),
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
    scale: f32,
    parallelism: Parallelism,
) {
    if b_cs == 1 && n >= AVX512_MIN_COLS && super::avx512::available() {
        // SAFETY: AVX-512 is available and `b`, with unit column stride, is panels side by side; the caller
        // guarantees the rest.
        return unsafe {
            avx512_product(
                (m, n, k),
                (dst, dst_rs, accumulate),
                (a, a_rs, a_cs),
                super::avx512::Panels::row_major(b, b_rs),
                scale,
                parallelism,
            )
        };
    }
    // SAFETY: the caller guarantees that the sizes and strides stay inside the buffers and that `dst`
    // overlaps neither operand, which is all gemm asks.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    };
}

/// [`super::avx512::product`] with [`strided_product`]'s arguments for the output and `a`.
///
/// # Safety
/// AVX-512 must be available; otherwise as for [`strided_product`], with `b` in panels.
unsafe fn avx512_product(
    dims: (usize, usize, usize),
    (dst, dst_rs, accumulate): (*mut f32, usize, bool),
    (a, a_rs, a_cs): (*const f32, usize, usize),
    b: super::avx512::Panels,
    scale: f32,
    parallelism: Parallelism,
) {
    let threads = match parallelism {
        Parallelism::Rayon(threads) => threads,
        _ => 1,
    };
    // SAFETY: this function's contract is `product`'s.
    unsafe {
        super::avx512::product(
            dims,
            super::avx512::Output {
                ptr: dst,
                row_stride: dst_rs,
                accumulate,
            },
            super::avx512::Operand {
                ptr: a,
                row_stride: a_rs,
                col_stride: a_cs,
            },
            b,
            scale,
            threads,
        )
    };
}

/// The shape of a padded self-attention over `qkv` `[batch × seq × 3·hidden]` (queries, keys and values side
/// by side in each row); sequence `b` is its first `lengths[b]` positions, the rest padding.
#[derive(Clone, Copy)]
pub struct Padded<'a> {
    /// Positions per sequence, padding included.
    pub seq: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Real positions of each sequence (≤ `seq`).
    pub lengths: &'a [usize],
}

impl Padded<'_> {
    fn hidden(&self) -> usize {
        size(self.heads, self.head_dim)
    }

    /// Checks the buffers (`qkv`, and the length of the `rows × hidden` one: a length, not a slice, because
    /// the caller may be writing that buffer through a raw pointer while the tasks run), then runs
    /// `task(b, h)` for every sequence and head, in parallel.
    fn each_head(&self, qkv: &[f32], other_len: usize, task: impl Fn(usize, usize) + Sync) {
        let (rows, hidden) = (size(self.lengths.len(), self.seq), self.hidden());
        assert_eq!(
            qkv.len(),
            size(rows, 3 * hidden),
            "attention: qkv is not rows × 3·hidden"
        );
        assert_eq!(
            other_len,
            size(rows, hidden),
            "attention: rows × hidden buffer differs"
        );
        assert!(
            self.lengths.iter().all(|&l| l <= self.seq),
            "attention: a length exceeds seq"
        );
        size(self.seq, self.seq);
        for_each_head(self.lengths, self.heads, task);
    }

    /// Softmax probabilities `[len × len]` of sequence `b`, head `h`.
    ///
    /// # Safety
    /// `qkv` must hold `batch × seq × 3·hidden` values (checked by [`Self::each_head`]).
    unsafe fn probabilities(&self, qkv: &[f32], b: usize, h: usize) -> Vec<f32> {
        let hidden = self.hidden();
        // SAFETY: sequence `b`'s rows lie inside `qkv` (this function's contract); its queries and keys are
        // `hidden` apart in each row of `3·hidden`.
        unsafe {
            let q = qkv
                .as_ptr()
                .add(b * self.seq * 3 * hidden + h * self.head_dim);
            head_probabilities(q, q.add(hidden), 3 * hidden, self.lengths[b], self.head_dim)
        }
    }
}

/// Scaled dot-product self-attention over a padded batch: `out` `[batch × seq × hidden]` gets each real
/// position's context (padded positions stay zero); keys beyond a sequence's length are not attended.
pub fn attention_padded(shape: &Padded, qkv: &[f32], out: &mut [f32]) {
    let hidden = shape.hidden();
    let out_ptr = SendPtr(out.as_mut_ptr());
    shape.each_head(qkv, out.len(), |b, h| {
        let len = shape.lengths[b];
        // SAFETY: sizes checked by each_head; each (b, h) writes only its own rows' head columns of `out`.
        unsafe {
            let p = shape.probabilities(qkv, b, h);
            let v = qkv
                .as_ptr()
                .add(b * shape.seq * 3 * hidden + 2 * hidden + h * shape.head_dim);
            strided_product(
                (len, shape.head_dim, len),
                (
                    out_ptr
                        .get()
                        .add(b * shape.seq * hidden + h * shape.head_dim),
                    hidden,
                    false,
                ),
                (p.as_ptr(), len, 1),
                (v, 3 * hidden, 1),
                1.0,
                Parallelism::None,
            );
        }
    });
}

/// The backward pass of [`attention_padded`]: `d_qkv` (`[batch × seq × 3·hidden]`, zero on entry) gets the
/// gradients of queries, keys and values from `grad` (`∂L/∂out`). The probabilities are recomputed rather
/// than kept from the forward pass (their product is a sliver of a layer's work at these lengths).
pub fn attention_padded_backward(shape: &Padded, qkv: &[f32], grad: &[f32], d_qkv: &mut [f32]) {
    let hidden = shape.hidden();
    assert_eq!(
        d_qkv.len(),
        qkv.len(),
        "attention backward: d_qkv differs from qkv"
    );
    let d_ptr = SendPtr(d_qkv.as_mut_ptr());
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    shape.each_head(qkv, grad.len(), |b, h| {
        let len = shape.lengths[b];
        let row = b * shape.seq;
        let col = h * shape.head_dim;
        let (hd, stride) = (shape.head_dim, 3 * hidden);
        // SAFETY: sizes checked by each_head; each (b, h) writes only its own rows' head columns of d_qkv.
        unsafe {
            let p = shape.probabilities(qkv, b, h);
            let q = qkv.as_ptr().add(row * stride + col);
            let (k, v) = (q.add(hidden), q.add(2 * hidden));
            let d_out = grad.as_ptr().add(row * hidden + col);
            let d_q = d_ptr.get().add(row * stride + col);
            let (d_k, d_v) = (d_q.add(hidden), d_q.add(2 * hidden));
            // dV = Pᵀ·dO; dP = dO·Vᵀ; dS = softmax backward; dQ = s·dS·K; dK = s·dSᵀ·Q.
            strided_product(
                (len, hd, len),
                (d_v, stride, false),
                (p.as_ptr(), 1, len),
                (d_out, hidden, 1),
                1.0,
                Parallelism::None,
            );
            let mut d_s = vec![0f32; len * len];
            strided_product(
                (len, len, hd),
                (d_s.as_mut_ptr(), len, false),
                (d_out, hidden, 1),
                (v, 1, stride),
                1.0,
                Parallelism::None,
            );
            softmax_backward_rows(&p, &mut d_s, len);
            strided_product(
                (len, hd, len),
                (d_q, stride, false),
                (d_s.as_ptr(), len, 1),
                (k, stride, 1),
                scale,
                Parallelism::None,
            );
            strided_product(
                (len, hd, len),
                (d_k, stride, false),
                (d_s.as_ptr(), 1, len),
                (q, stride, 1),
                scale,
                Parallelism::None,
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::max_diff;

    #[test]
    fn gelu_with_its_derivative_agrees_with_gelu_and_its_backward_pass() {
        let n = 2 * PARALLEL_ELEMENTS + 5;
        let x = crate::rng::Rng::new(3).uniform(n, 6.0);
        let (mut out, mut derivative) = (x.clone(), vec![0f32; n]);
        gelu_with_derivative(&mut out, &mut derivative);
        let mut gelu = x.clone();
        gelu_inplace(&mut gelu);
        assert_eq!(out, gelu);
        let mut ones = vec![1f32; n];
        gelu_backward(&x, &mut ones);
        let diff = max_diff(&ones, &derivative);
        assert!(diff < 1e-6, "derivatives differ by {diff}");
        let g = crate::rng::Rng::new(4).uniform(n, 1.0);
        let mut product = g.clone();
        mul_inplace(&mut product, &derivative);
        let mut backward = g;
        gelu_backward(&x, &mut backward);
        let diff = max_diff(&product, &backward);
        assert!(diff < 1e-6, "gradients differ by {diff}");
    }

    #[test]
    fn row_and_elementwise_kernels_split_across_threads_agree_with_one_pass() {
        let width = 48;
        let n = width * (2 * PARALLEL_ELEMENTS / width + 3);
        let x = crate::rng::Rng::new(9).uniform(n, 3.0);
        let g = crate::rng::Rng::new(10).uniform(n, 1.0);
        let mut whole = x.clone();
        softmax_inplace(&mut whole, width);
        let mut serial = x.clone();
        softmax_rows(&mut serial, width);
        assert_eq!(whole, serial, "softmax");
        let (mut whole_g, mut serial_g) = (g.clone(), g.clone());
        softmax_backward(&whole, &mut whole_g, width);
        softmax_backward_rows(&serial, &mut serial_g, width);
        assert_eq!(whole_g, serial_g, "softmax backward");
        let (mut whole_g, mut serial_g) = (g.clone(), g);
        gelu_backward(&x, &mut whole_g);
        gelu_backward_chunk(&x, &mut serial_g);
        assert_eq!(whole_g, serial_g, "gelu backward");
    }

    #[test]
    fn fast_exp_matches_libm_to_two_ulps_in_relative_terms() {
        for i in -8000..8000 {
            let x = i as f32 / 100.0;
            // The reference in f64, rounded once: f32's own exp may be a few ulps off (Miri makes it so).
            let want = (x as f64).exp() as f32;
            let got = fast_exp(x);
            assert!(
                ((got - want) / want).abs() < 4e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn fast_erf_is_within_three_tenths_of_a_millionth() {
        for i in -600..600 {
            let x = i as f32 / 100.0;
            let want = libm_erf(x as f64) as f32;
            assert!(
                (fast_erf(x) - want).abs() < 3e-7,
                "erf({x}): {} vs {want}",
                fast_erf(x)
            );
        }
    }

    // A series evaluation of erf in f64, independent of the approximation under test.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let mut sum = 0.0f64;
        let mut term = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 5.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn linear_with_bias_matches_the_naive_triple_loop() {
        let (rows, k, n) = (5, 7, 3);
        let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let b = [0.5, -1.0, 2.0];
        let mut out = vec![f32::NAN; rows * n];
        linear(&x, rows, k, &w, Some(&b), n, &mut out);
        for r in 0..rows {
            for j in 0..n {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum::<f32>() + b[j];
                assert!((out[r * n + j] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn padded_attention_equals_packed_attention_and_its_backward_leaves_padding_alone() {
        let (heads, head_dim, seq, lengths) = (2, 2, 3, [3usize, 2]);
        let hidden = heads * head_dim;
        let qkv = crate::rng::Rng::new(5).uniform(lengths.len() * seq * 3 * hidden, 1.0);
        let shape = Padded {
            seq,
            heads,
            head_dim,
            lengths: &lengths,
        };
        let mut padded = vec![0.0; lengths.len() * seq * hidden];
        attention_padded(&shape, &qkv, &mut padded);
        let (mut q, mut k, mut v, mut rows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (b, &len) in lengths.iter().enumerate() {
            for pos in 0..len {
                let row = &qkv[(b * seq + pos) * 3 * hidden..][..3 * hidden];
                q.extend_from_slice(&row[..hidden]);
                k.extend_from_slice(&row[hidden..2 * hidden]);
                v.extend_from_slice(&row[2 * hidden..]);
                rows.push(b * seq + pos);
            }
        }
        let mut packed = vec![0.0; q.len()];
        attention(&q, &k, &v, &[0, 3, 5], heads, head_dim, &mut packed);
        for (t, &row) in rows.iter().enumerate() {
            let diff = max_diff(
                &padded[row * hidden..][..hidden],
                &packed[t * hidden..][..hidden],
            );
            assert!(diff < 1e-6, "row {row} differs by {diff}");
        }
        assert!(
            padded[5 * hidden..].iter().all(|&x| x == 0.0),
            "padding stays zero"
        );
        let grad = vec![1.0; padded.len()];
        let mut d_qkv = vec![0.0; qkv.len()];
        attention_padded_backward(&shape, &qkv, &grad, &mut d_qkv);
        assert!(d_qkv.iter().all(|g| g.is_finite()));
        assert!(
            d_qkv[5 * 3 * hidden..].iter().all(|&g| g == 0.0),
            "padding gets no gradient"
        );
    }

    #[test]
    fn attention_of_a_single_token_returns_its_value() {
        let (heads, dim) = (2, 3);
        let q = vec![0.3; heads * dim];
        let k = vec![-0.2; heads * dim];
        let v: Vec<f32> = (0..heads * dim).map(|i| i as f32).collect();
        let mut out = vec![0.0; heads * dim];
        attention(&q, &k, &v, &[0, 1], heads, dim, &mut out);
        assert_eq!(out, v);
    }

    #[test]
    fn layer_norm_rows_have_zero_mean_and_unit_variance() {
        let mut x: Vec<f32> = (0..40).map(|i| (i * i) as f32 * 0.1).collect();
        add_layer_norm_inplace(&mut x, None, &[1.0; 8], &[0.0; 8], 1e-12);
        for row in x.chunks(8) {
            let mean: f32 = row.iter().sum::<f32>() / 8.0;
            let var: f32 = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 8.0;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3);
        }
    }

    #[test]
    fn a_packed_weight_gives_the_product_with_its_transpose_and_takes_a_merged_delta() {
        // 200 outputs: six full panels and a zero-padded seventh; 40 rows of 150: enough work to split the
        // columns across threads, the last task's masked. Under Miri, 70 outputs (a padded third panel).
        let (n, k, m) = if cfg!(miri) {
            (70, 5, 3)
        } else {
            (200, 150, 40)
        };
        let w = crate::rng::Rng::new(1).uniform(n * k, 1.0);
        let Some(mut packed) = PackedWeight::new(&w, n, k) else {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        };
        let x = crate::rng::Rng::new(2).uniform(m * k, 1.0);
        let delta = crate::rng::Rng::new(3).uniform(n * k, 0.1);
        packed.add(&delta);
        assert_eq!(packed.dims(), (n, k));
        let merged: Vec<f32> = w.iter().zip(&delta).map(|(w, d)| w + d).collect();
        let mut out = vec![1f32; m * n];
        add_packed_linear(&x, m, &packed, &mut out);
        for i in 0..m {
            for j in 0..n {
                let dot: f32 = (0..k).map(|p| x[i * k + p] * merged[j * k + p]).sum();
                let got = out[i * n + j];
                assert!(
                    (got - 1.0 - dot).abs() < 1e-3,
                    "({i}, {j}): {got} vs {}",
                    1.0 + dot
                );
            }
        }
    }
}

#[cfg(test)]
mod guard_tests {
    use super::*;

    #[test]
    #[should_panic(expected = "offsets")]
    fn attention_refuses_decreasing_offsets() {
        let mut out = vec![0.0; 2];
        attention(&[0.0; 2], &[0.0; 2], &[0.0; 2], &[0, 2, 1], 1, 2, &mut out);
    }

    #[test]
    #[should_panic(expected = "overflows")]
    fn linear_refuses_sizes_that_overflow() {
        linear(&[], 1 << 62, 4, &[], None, 4, &mut []);
    }
}
