//! f32 matrix products with AVX-512, for CPUs that have it (checked at run time).
//!
//! The `gemm` crate's stable build runs its AVX2 kernels on such CPUs and so leaves half of each FMA unit
//! idle; on a Zen 5 core this kernel does the same products about 1.7× faster. It reads its right-hand
//! operand as panels of [`TILE_COLS`] columns, each row of a panel contiguous: a row-major matrix with unit
//! column stride is such panels side by side (a weight read as it is stored, an activation), and
//! [`PackedWeight`] lays a linear's weight out as panels one after another, so that each streams from memory
//! in order. Everything else stays with `gemm`.
//!
//! The kernel keeps a tile of [`TILE_ROWS`] × [`TILE_COLS`] results in 24 of the 32 vector registers, and
//! for each step along the inner dimension multiplies one broadcast value of each left-hand row by two
//! vectors of the panel's row. The last columns of a product narrower than a tile are masked.

#[cfg(all(target_arch = "x86_64", not(miri)))]
use std::arch::x86_64::{
    __m512, _mm512_fmadd_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_mul_ps,
    _mm512_set1_ps, _mm512_setzero_ps,
};

use rayon::prelude::*;

/// Rows of the result one kernel call computes.
const TILE_ROWS: usize = 12;
/// Columns of the result one kernel call computes: two 16-lane vectors.
const TILE_COLS: usize = 32;
/// Rows per parallel task: 35–140 µs of work at BERT-small widths, and 22 tasks for a 1,024-row batch, which
/// two threads share within one task of each other.
const TASK_ROWS: usize = 48;
/// Steps along the inner dimension per pass over a tile: a 384-deep panel of the right-hand operand
/// (48 KiB) stays in L1/L2 while every row block of the task streams past it.
const DEPTH: usize = 384;

/// Whether this CPU runs the AVX-512 kernels (checked once): it has AVX-512F and the environment does not
/// set `FLYWHEEL_AVX512=off`, which keeps every product on `gemm`'s AVX2 kernels (to compare the two, or on
/// CPUs that lower their clock for AVX-512).
pub(crate) fn available() -> bool {
    // Miri runs the scalar stand-in for the kernel below, so the packing, tiling and threading around it
    // are checked for undefined behaviour.
    #[cfg(miri)]
    return true;
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX512.get_or_init(|| {
            std::env::var("FLYWHEEL_AVX512").map_or(true, |v| v != "off")
                && std::arch::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A matrix operand: its first element and the distance between rows and between columns, in elements.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    pub ptr: *const f32,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// A right-hand operand in panels of [`TILE_COLS`] columns: element `(row, col)` lies at
/// `ptr + (col / TILE_COLS) · panel_stride + row · row_stride + col % TILE_COLS`.
#[derive(Clone, Copy)]
pub(crate) struct Panels {
    pub ptr: *const f32,
    pub row_stride: usize,
    pub panel_stride: usize,
}

impl Panels {
    /// A row-major matrix with unit column stride and rows `row_stride` apart.
    pub(crate) fn row_major(ptr: *const f32, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride,
            panel_stride: TILE_COLS,
        }
    }
}

/// The result: first element and row stride (columns are adjacent), and whether the product adds onto
/// what it holds.
#[derive(Clone, Copy)]
pub(crate) struct Output {
    pub ptr: *mut f32,
    pub row_stride: usize,
    pub accumulate: bool,
}

// SAFETY: the pointers are only dereferenced inside `product`, whose contract makes the caller guarantee
// that they are valid for its whole run; parallel tasks write disjoint tiles of the output.
unsafe impl Send for Operand {}
// SAFETY: as for `Operand: Send` above.
unsafe impl Sync for Operand {}
// SAFETY: as for `Operand: Send` above.
unsafe impl Send for Panels {}
// SAFETY: as for `Operand: Send` above.
unsafe impl Sync for Panels {}
// SAFETY: as for `Operand: Send` above.
unsafe impl Send for Output {}
// SAFETY: as for `Operand: Send` above.
unsafe impl Sync for Output {}

/// A linear's weight `W`, `[n × k]` (PyTorch's layout), as panels of `Wᵀ`: panel `p` holds, for each of the
/// `k` inputs, the weights of outputs `32p .. 32p + 32` (zeros past `n`). A product then streams each panel
/// from memory in order, which matters most when few rows share each weight (one short request).
#[derive(Debug, Clone)]
pub struct PackedWeight {
    data: Vec<f32>,
    n: usize,
    k: usize,
}

impl PackedWeight {
    /// Packs `w` `[n × k]`, or `None` where [`available`] is false (nothing here could read the panels).
    pub fn new(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if !available() {
            return None;
        }
        assert_eq!(
            Some(w.len()),
            n.checked_mul(k),
            "PackedWeight: w is not n × k"
        );
        let panel = TILE_COLS * k;
        let mut data = vec![0f32; n.div_ceil(TILE_COLS) * panel];
        let fill = |(p, panel): (usize, &mut [f32])| {
            let outputs = (p * TILE_COLS..n).take(TILE_COLS);
            for (j, row) in outputs.map(|o| &w[o * k..(o + 1) * k]).enumerate() {
                for (i, &value) in row.iter().enumerate() {
                    panel[i * TILE_COLS + j] = value;
                }
            }
        };
        if data.len() >= PARALLEL_PACK {
            data.par_chunks_mut(panel.max(1)).enumerate().for_each(fill);
        } else {
            data.chunks_mut(panel.max(1)).enumerate().for_each(fill);
        }
        Some(Self { data, n, k })
    }

    /// Outputs (`n`) and inputs (`k`).
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The weight as it was given to [`PackedWeight::new`], `[n × k]`.
    pub fn unpacked(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut w = vec![0f32; n * k];
        for (o, row) in w.chunks_exact_mut(k.max(1)).take(n).enumerate() {
            let panel = &self.data[(o / TILE_COLS) * TILE_COLS * k..];
            for (i, value) in row.iter_mut().enumerate() {
                *value = panel[i * TILE_COLS + o % TILE_COLS];
            }
        }
        w
    }

    /// Adds `delta` (`[n × k]`, laid out as [`PackedWeight::new`]'s `w`): a merged LoRA update.
    pub fn add(&mut self, delta: &[f32]) {
        let packed =
            Self::new(delta, self.n, self.k).expect("a packed weight exists, so AVX-512 does");
        self.data
            .iter_mut()
            .zip(packed.data)
            .for_each(|(w, d)| *w += d);
    }

    /// The panels, for [`product`].
    pub(crate) fn panels(&self) -> Panels {
        Panels {
            ptr: self.data.as_ptr(),
            row_stride: TILE_COLS,
            panel_stride: TILE_COLS * self.k,
        }
    }
}

/// Values from which packing splits across rayon's pool.
const PARALLEL_PACK: usize = 1 << 16;

/// `out = (accumulate ? out : 0) + scale · a·b` for `a` `[m × k]` and `b` `[k × n]` in panels. With `threads`
/// above 1 it cuts enough tasks for that many threads and runs them on rayon's current pool.
///
/// # Safety
/// [`available`] must be true; every element the sizes and strides reach must lie inside live buffers, and
/// `out` must not overlap `a` or `b`.
pub(crate) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    out: Output,
    a: Operand,
    b: Panels,
    scale: f32,
    threads: usize,
) {
    debug_assert!(available());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: the result is zero, or what the output held.
        if !out.accumulate {
            for i in 0..m {
                // SAFETY: row `i` of the `m × n` output lies inside its buffer (this function's contract).
                unsafe { std::ptr::write_bytes(out.ptr.add(i * out.row_stride), 0, n) };
            }
        }
        return;
    }
    let row_tasks = m.div_ceil(TASK_ROWS);
    // Few rows (a [CLS]-only layer, one short sequence): split the columns too, so every thread has work.
    let col_tasks = if threads > 1 {
        (2 * threads)
            .div_ceil(row_tasks)
            .clamp(1, n.div_ceil(TILE_COLS))
    } else {
        1
    };
    let col_width = n.div_ceil(col_tasks).div_ceil(TILE_COLS) * TILE_COLS;
    // Rounding the width up to whole panels may leave fewer tasks with columns.
    let col_tasks = n.div_ceil(col_width);
    let task = |t: usize| {
        let (rows, cols) = (t / col_tasks, t % col_tasks);
        let (r0, c0) = (rows * TASK_ROWS, cols * col_width);
        let region = (r0..m.min(r0 + TASK_ROWS), c0..n.min(c0 + col_width));
        // SAFETY: the region lies inside the `m × n` result, and regions of different tasks are disjoint.
        unsafe { block(region, k, out, a, b, scale) }
    };
    if threads > 1 && row_tasks * col_tasks > 1 {
        (0..row_tasks * col_tasks).into_par_iter().for_each(task);
    } else {
        (0..row_tasks * col_tasks).for_each(task);
    }
}

/// Rows `rows` and columns `cols` of the product, tile by tile, in passes of [`DEPTH`] along `k`.
///
/// # Safety
/// As for [`product`], for this region.
unsafe fn block(
    (rows, cols): (std::ops::Range<usize>, std::ops::Range<usize>),
    k: usize,
    out: Output,
    a: Operand,
    b: Panels,
    scale: f32,
) {
    let mut k0 = 0;
    while k0 < k {
        let depth = DEPTH.min(k - k0);
        let accumulate = out.accumulate || k0 > 0;
        for c in cols.clone().step_by(TILE_COLS) {
            let width = TILE_COLS.min(cols.end - c);
            // Tasks' column ranges start at multiples of TILE_COLS, so `c` starts a panel.
            // SAFETY: panel `c / TILE_COLS`, step `k0`, lies inside `b` (this function's contract).
            let b_panel = unsafe {
                b.ptr
                    .add((c / TILE_COLS) * b.panel_stride + k0 * b.row_stride)
            };
            let mut r = rows.start;
            while r < rows.end {
                let height = TILE_ROWS.min(rows.end - r);
                // SAFETY: row `r`, step `k0` of `a` and element (r, c) of `out` lie inside their buffers,
                // and the tile they start is inside this block's region (this function's contract).
                unsafe {
                    let a_rows = Operand {
                        ptr: a.ptr.add(r * a.row_stride + k0 * a.col_stride),
                        ..a
                    };
                    let tile_out = Output {
                        ptr: out.ptr.add(r * out.row_stride + c),
                        accumulate,
                        ..out
                    };
                    let b_panel = Panels { ptr: b_panel, ..b };
                    tile_of(height, (depth, width), tile_out, a_rows, b_panel, scale);
                }
                r += height;
            }
        }
        k0 += depth;
    }
}

/// One tile of `height` (1 to [`TILE_ROWS`]) rows: dispatches to the kernel compiled for that height.
///
/// # Safety
/// As for [`product`], for this tile.
unsafe fn tile_of(
    height: usize,
    dims: (usize, usize),
    out: Output,
    a: Operand,
    b: Panels,
    scale: f32,
) {
    macro_rules! heights {
        ($($h:literal)*) => {
            match height {
                $($h => tile::<$h>(dims, out, a, b, scale),)*
                _ => unreachable!("tile height {height} is outside 1..={TILE_ROWS}"),
            }
        };
    }
    // SAFETY: this function's contract is `tile`'s for this height.
    unsafe { heights!(1 2 3 4 5 6 7 8 9 10 11 12) }
}

/// Lane masks of the two vectors covering the first `width` (≤ [`TILE_COLS`]) columns of a tile.
fn masks(width: usize) -> (u16, u16) {
    let lanes = |w: usize| match w {
        0 => 0,
        16.. => u16::MAX,
        w => (1u16 << w) - 1,
    };
    (lanes(width), lanes(width.saturating_sub(16)))
}

/// `R` rows × `width` (≤ [`TILE_COLS`]) columns of the result over `depth` steps along the inner dimension.
///
/// # Safety
/// AVX-512F must be available; `R` rows of `depth` values of `a`, `depth` rows of `width` values of `b`
/// and `R` rows of `width` values of `out` must be valid.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize>(
    (depth, width): (usize, usize),
    out: Output,
    a: Operand,
    b: Panels,
    scale: f32,
) {
    // SAFETY: AVX-512F is available and every address read or written unmasked is valid (this function's
    // contract); masked lanes are never touched.
    unsafe {
        let (low, high) = masks(width);
        let mut sums: [[__m512; 2]; R] = [[_mm512_setzero_ps(); 2]; R];
        let (mut a_step, mut b_row) = (a.ptr, b.ptr);
        for _ in 0..depth {
            let b0 = _mm512_maskz_loadu_ps(low, b_row);
            // `wrapping_add`: past a narrow tile's edge, or after the last step, the address may lie outside
            // the buffer; the masks keep it from being read.
            let b1 = _mm512_maskz_loadu_ps(high, b_row.wrapping_add(16));
            for (i, sum) in sums.iter_mut().enumerate() {
                let value = _mm512_set1_ps(*a_step.add(i * a.row_stride));
                sum[0] = _mm512_fmadd_ps(value, b0, sum[0]);
                sum[1] = _mm512_fmadd_ps(value, b1, sum[1]);
            }
            a_step = a_step.wrapping_add(a.col_stride);
            b_row = b_row.wrapping_add(b.row_stride);
        }
        let scale = _mm512_set1_ps(scale);
        for (i, sum) in sums.iter().enumerate() {
            let row = out.ptr.add(i * out.row_stride);
            for (half, mask) in [(0, low), (1, high)] {
                let at = row.wrapping_add(16 * half);
                let value = if out.accumulate {
                    _mm512_fmadd_ps(scale, sum[half], _mm512_maskz_loadu_ps(mask, at))
                } else {
                    _mm512_mul_ps(scale, sum[half])
                };
                _mm512_mask_storeu_ps(at, mask, value);
            }
        }
    }
}

/// The kernel's stand-in under Miri (which runs few AVX-512 intrinsics): the same results, reading and
/// writing exactly the addresses the vector kernel touches unmasked.
///
/// # Safety
/// As for the AVX-512 kernel, without the CPU requirement.
#[cfg(miri)]
unsafe fn tile<const R: usize>(
    (depth, width): (usize, usize),
    out: Output,
    a: Operand,
    b: Panels,
    scale: f32,
) {
    // SAFETY: the addresses are those the vector kernel reads or writes unmasked (its contract).
    unsafe {
        let mut sums = [[0f32; TILE_COLS]; R];
        let (mut a_step, mut b_row) = (a.ptr, b.ptr);
        for _ in 0..depth {
            for (i, sum) in sums.iter_mut().enumerate() {
                let value = *a_step.add(i * a.row_stride);
                for (j, s) in sum[..width].iter_mut().enumerate() {
                    *s = value.mul_add(*b_row.add(j), *s);
                }
            }
            a_step = a_step.wrapping_add(a.col_stride);
            b_row = b_row.wrapping_add(b.row_stride);
        }
        for (i, sum) in sums.iter().enumerate() {
            let row = out.ptr.add(i * out.row_stride);
            for (j, &s) in sum[..width].iter().enumerate() {
                let at = row.add(j);
                *at = if out.accumulate {
                    scale.mul_add(s, *at)
                } else {
                    scale * s
                };
            }
        }
    }
}

#[cfg(all(not(target_arch = "x86_64"), not(miri)))]
unsafe fn tile<const R: usize>(_: (usize, usize), _: Output, _: Operand, _: Panels, _: f32) {
    unreachable!("AVX-512 kernels run only on x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(accumulate ? out : 0) + scale · a·b` computed the slow way, in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        (m, n, k): (usize, usize, usize),
        out: &[f32],
        out_rs: usize,
        accumulate: bool,
        (a, a_rs, a_cs): (&[f32], usize, usize),
        (b, b_rs): (&[f32], usize),
        scale: f32,
    ) -> Vec<f32> {
        let mut expected = out.to_vec();
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| a[i * a_rs + p * a_cs] as f64 * b[p * b_rs + j] as f64)
                    .sum();
                let base = if accumulate { out[i * out_rs + j] } else { 0.0 };
                expected[i * out_rs + j] = base + scale * dot as f32;
            }
        }
        expected
    }

    #[test]
    fn products_of_every_tile_shape_and_layout_match_a_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut seed = 7;
        let mut values = |n: usize| {
            seed += 1;
            crate::rng::Rng::new(seed).uniform(n, 1.0)
        };
        // Sizes around the tile and task edges; inner sizes below, at and above one DEPTH pass.
        for &(m, n, k) in [
            (1, 1, 1),
            (3, 40, 0),
            (5, 17, 3),
            (12, 32, 384),
            (13, 33, 385),
            (49, 70, 100),
            (100, 64, 800),
            (16, 1536, 40),
        ]
        .iter()
        // Miri (a thousand times slower) takes small shapes that still cross every tile, task and depth
        // edge: 49 rows (past a 48-row task), 33 columns (past a 32-column tile), 385 steps (past a pass).
        .filter(|_| !cfg!(miri))
        .chain(
            cfg!(miri)
                .then_some(&[(1, 1, 1), (5, 17, 3), (49, 33, 2), (2, 3, 385)][..])
                .into_iter()
                .flatten(),
        ) {
            for (a_transposed, accumulate, threads) in
                [(false, false, 1), (true, true, 2), (false, true, 2)]
            {
                // The output and the right-hand operand have rows wider than the product, as in a column
                // window of a wider buffer.
                let (out_rs, b_rs) = (n + 3, n + 5);
                let a = values(m * k);
                let b = values(k * b_rs);
                let mut out = values(m * out_rs);
                let (a_rs, a_cs) = if a_transposed { (1, m) } else { (k, 1) };
                let scale = 0.5;
                let expected = reference(
                    (m, n, k),
                    &out,
                    out_rs,
                    accumulate,
                    (&a, a_rs, a_cs),
                    (&b, b_rs),
                    scale,
                );
                // SAFETY: AVX-512 is available; the buffers hold every element these strides reach.
                unsafe {
                    product(
                        (m, n, k),
                        Output {
                            ptr: out.as_mut_ptr(),
                            row_stride: out_rs,
                            accumulate,
                        },
                        Operand {
                            ptr: a.as_ptr(),
                            row_stride: a_rs,
                            col_stride: a_cs,
                        },
                        Panels::row_major(b.as_ptr(), b_rs),
                        scale,
                        threads,
                    );
                }
                let worst = out
                    .iter()
                    .zip(&expected)
                    .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-4,
                    "{m}×{n}×{k} (a transposed {a_transposed}, accumulate {accumulate}): off by {worst}"
                );
            }
        }
    }

    #[test]
    fn unpacking_gives_back_the_weight() {
        for (n, k) in [(1, 1), (33, 7), (64, 5)] {
            let w: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
            if let Some(packed) = PackedWeight::new(&w, n, k) {
                assert_eq!(packed.unpacked(), w, "{n} × {k}");
            }
        }
    }

    #[test]
    fn the_masks_cover_exactly_the_tile_width() {
        assert_eq!(masks(0), (0, 0));
        assert_eq!(masks(1), (1, 0));
        assert_eq!(masks(16), (u16::MAX, 0));
        assert_eq!(masks(17), (u16::MAX, 1));
        assert_eq!(masks(32), (u16::MAX, u16::MAX));
    }
}
