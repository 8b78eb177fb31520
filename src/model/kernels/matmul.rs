//! Products: a linear layer with its bias, low-rank deltas onto a linear's columns, the gradients of both,
//! packed weights for the AVX-512 kernel, and the one strided product every other kernel goes through.

use gemm::Parallelism;

use super::*;

/// How a row-major weight `w` enters a product.
#[derive(Clone, Copy)]
pub(super) enum Weight {
    /// `w` is `[cols × inner]` (PyTorch's `Linear` layout) and the product uses `wᵀ`.
    Transposed,
    /// `w` is `[inner × cols]` and the product uses it as it is.
    AsIs,
}

/// `out[rows × cols] = (accumulate ? out : 0) + scale · a[rows × inner] · W`, with `W` read from `w` as
/// `layout` says: the bounds-checked form of [`strided_product`] for whole row-major buffers.
#[allow(clippy::too_many_arguments)]
pub(super) fn product(
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
pub(super) fn start_from_bias(what: &str, out: &mut [f32], bias: Option<&[f32]>, n: usize) -> bool {
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
    rows >= PACK_MIN_ROWS && outputs >= AVX512_MIN_COLS && super::super::avx512::available()
}

/// Rows from which packing a weight for one product pays: the break-even point measured ~120 rows at BERT-small
/// widths, and twice that leaves a margin for slower memory.
pub(super) const PACK_MIN_ROWS: usize = 256;
/// Columns from which a product goes to the AVX-512 kernel: narrower ones (a LoRA rank, a 2-label head) fill
/// too little of its 32-column tile.
pub(super) const AVX512_MIN_COLS: usize = 16;

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

/// A strided product `dst = (accumulate ? dst : 0) + scale · a·b` (`[m × n]`, row stride `dst_rs`) of `a`
/// `[m × k]` and `b` `[k × n]`, each given by its row and column strides. The one place the kernels call
/// into gemm, or into the AVX-512 kernel for the products it covers.
///
/// # Safety
/// Every index the strides and sizes reach must lie inside the pointed-to buffers, and `dst` must not
/// overlap `a` or `b`.
pub(super) unsafe fn strided_product(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, accumulate): (*mut f32, usize, bool),
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
    scale: f32,
    parallelism: Parallelism,
) {
    if b_cs == 1 && n >= AVX512_MIN_COLS && super::super::avx512::available() {
        // SAFETY: AVX-512 is available and `b`, with unit column stride, is panels side by side; the caller
        // guarantees the rest.
        return unsafe {
            avx512_product(
                (m, n, k),
                (dst, dst_rs, accumulate),
                (a, a_rs, a_cs),
                super::super::avx512::Panels::row_major(b, b_rs),
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

/// [`super::super::avx512::product`] with [`strided_product`]'s arguments for the output and `a`.
///
/// # Safety
/// AVX-512 must be available; otherwise as for [`strided_product`], with `b` in panels.
pub(super) unsafe fn avx512_product(
    dims: (usize, usize, usize),
    (dst, dst_rs, accumulate): (*mut f32, usize, bool),
    (a, a_rs, a_cs): (*const f32, usize, usize),
    b: super::super::avx512::Panels,
    scale: f32,
    parallelism: Parallelism,
) {
    let threads = match parallelism {
        Parallelism::Rayon(threads) => threads,
        _ => 1,
    };
    // SAFETY: this function's contract is `product`'s.
    unsafe {
        super::super::avx512::product(
            dims,
            super::super::avx512::Output {
                ptr: dst,
                row_stride: dst_rs,
                accumulate,
            },
            super::super::avx512::Operand {
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
