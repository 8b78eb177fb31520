//! int8 products on the CPU's integer dot-product instructions (AVX512-VNNI's `vpdpbusd`), for serving at
//! `model.precision = "int8"`.
//!
//! A linear's weight is quantised once, per output channel and symmetrically: `w[n][k] ≈ s_w[n] · q[n][k]`
//! with `q` in [-127, 127]. Its input is quantised per row at each product, asymmetrically, to the unsigned
//! bytes `vpdpbusd` takes: `x[m][k] ≈ s_x[m] · (u[m][k] − z[m])` with `u` in [0, 255] spanning the row's
//! range (zero included, so it stays exact) and the zero point `z[m]`, whose share is taken off each sum
//! once:
//!
//! `y[m][n] = s_x[m] · s_w[n] · (Σ_k u[m][k] · q[n][k] − z[m] · Σ_k q[n][k]) + b[n]`
//!
//! Asymmetric inputs matter after GELU, whose outputs are almost all ≥ 0: a symmetric scale would leave
//! half of the 256 steps unused.
//!
//! The sums are exact in i32 (|u·q| ≤ 255 · 127, so up to 66,000 inputs). Weights are laid out as panels of
//! [`PANEL`] outputs; within a panel, each group of four inputs holds the 64 outputs' four bytes side by side,
//! which is the operand `vpdpbusd` takes, so one 64-byte load feeds 16 outputs four inputs deep.
//!
//! One file past 500 lines on purpose: the quantisation, the packed layout, the kernel and its scalar
//! reference each depend on the others' layouts.

#[cfg(all(target_arch = "x86_64", not(miri)))]
use std::arch::x86_64::{
    __m512i, _mm512_cvtepi32_ps, _mm512_dpbusd_epi32, _mm512_fmadd_ps, _mm512_loadu_si512,
    _mm512_mask_storeu_ps, _mm512_maskz_loadu_epi32, _mm512_maskz_loadu_ps, _mm512_mul_ps,
    _mm512_mullo_epi32, _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_si512, _mm512_sub_epi32,
};

use rayon::prelude::*;

/// Outputs per panel: four 16-lane vectors of i32 sums.
pub const PANEL: usize = 64;
/// Inputs one `vpdpbusd` lane sums.
const GROUP: usize = 4;
/// Rows of the result one kernel call computes (24 sum registers, 4 weight registers, 1 broadcast).
const TILE_ROWS: usize = 6;
/// Rows per parallel task.
const TASK_ROWS: usize = 48;
/// Multiply-adds below which a product runs on the calling thread alone (small under Miri, so the shapes it
/// can afford still take the parallel paths).
const PARALLEL_WORK: usize = if cfg!(miri) { 1 << 10 } else { 1 << 20 };

/// Whether this CPU runs the VNNI kernel (checked once): AVX-512F, BW and VNNI, and the environment does not
/// set `FLYWHEEL_INT8_KERNEL=off` (which makes `int8` serve in f32, to compare the two).
pub fn available() -> bool {
    #[cfg(miri)]
    return true;
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| {
            std::env::var("FLYWHEEL_INT8_KERNEL").map_or(true, |v| v != "off")
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A linear's weight `[n × k]` quantised per output channel, in [`PANEL`]-wide panels.
#[derive(Debug, Clone)]
pub struct QuantWeight {
    /// Panel `p`, group `g`, output `c` of the panel, input `i` of the group at
    /// `p · groups · PANEL · GROUP + g · PANEL · GROUP + c · GROUP + i` (zeros past `n` and `k`).
    packed: Vec<i8>,
    /// `s_w` per output.
    scales: Vec<f32>,
    /// `Σ_k q[n][k]` per output.
    sums: Vec<i32>,
    /// `1 / s[k]` per input where the weight was smoothed (see [`QuantWeight::smoothed`]): the factor each
    /// input is multiplied by before it is quantised.
    unsmooth: Option<Vec<f32>>,
    n: usize,
    k: usize,
}

impl QuantWeight {
    /// Quantises `w` `[n × k]` (PyTorch's layout). Non-finite weights quantise to zero (the model loader
    /// refuses them before).
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        Self::build(w, n, k, None)
    }

    /// Quantises `w` after moving part of its input's range into it, as SmoothQuant does (Xiao et al.,
    /// 2023): input `j` is divided by `s[j] = √(input_range[j] / max_n |w[n][j]|)` and weight column `j`
    /// multiplied by it, which leaves the product unchanged but evens out the channels, so that the few
    /// inputs with a large range (BERT's LayerNorm outputs have some) no longer take the resolution of the
    /// rest of their row. `input_range[j]` estimates how large input `j` gets.
    pub fn smoothed(w: &[f32], n: usize, k: usize, input_range: &[f32]) -> Self {
        assert_eq!(
            input_range.len(),
            k,
            "QuantWeight: one input range per input"
        );
        let mut column_max = vec![0f32; k];
        for row in w.chunks_exact(k.max(1)) {
            for (m, v) in column_max.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
        let smooth: Vec<f32> = input_range
            .iter()
            .zip(&column_max)
            .map(|(&a, &m)| {
                let s = (a / m).sqrt();
                if s.is_finite() && s > 0.0 {
                    s
                } else {
                    1.0
                }
            })
            .collect();
        Self::build(w, n, k, Some(smooth.iter().map(|s| 1.0 / s).collect()))
    }

    /// Quantises `w`, its column `j` first divided by `unsmooth[j]` where given.
    fn build(w: &[f32], n: usize, k: usize, unsmooth: Option<Vec<f32>>) -> Self {
        assert_eq!(
            Some(w.len()),
            n.checked_mul(k),
            "QuantWeight: w is not n × k"
        );
        let groups = k.div_ceil(GROUP);
        let panel_len = groups * PANEL * GROUP;
        let mut packed = vec![0i8; n.div_ceil(PANEL) * panel_len];
        let mut scales = vec![0f32; n];
        let mut sums = vec![0i32; n];
        for (o, row) in w.chunks_exact(k.max(1)).take(n).enumerate() {
            let smoothed: Vec<f32>;
            let row = match &unsmooth {
                Some(u) => {
                    smoothed = row.iter().zip(u).map(|(v, u)| v / u).collect();
                    &smoothed
                }
                None => row,
            };
            let (scale, inverse) = scale_of(row);
            scales[o] = scale;
            let mut sum = 0i32;
            for (i, &v) in row.iter().enumerate() {
                let q = quantize(v, inverse);
                sum += i32::from(q);
                packed[packed_index(panel_len, o, i)] = q;
            }
            sums[o] = sum;
        }
        Self {
            packed,
            scales,
            sums,
            unsmooth,
            n,
            k,
        }
    }

    /// This weight plus `delta` (`[n × k]`, a merged LoRA update), quantised again with the same smoothing.
    pub fn plus(&self, delta: &[f32]) -> Self {
        let (n, k) = (self.n, self.k);
        let mut w = self.dequantized();
        w.iter_mut().zip(delta).for_each(|(w, d)| *w += d);
        Self::build(&w, n, k, self.unsmooth.clone())
    }

    /// Outputs (`n`) and inputs (`k`).
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The weight the quantised one stands for, `[n × k]`.
    pub fn dequantized(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let panel_len = k.div_ceil(GROUP) * PANEL * GROUP;
        let mut w = vec![0f32; n * k];
        for (o, row) in w.chunks_exact_mut(k.max(1)).take(n).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                let q = self.packed[packed_index(panel_len, o, i)];
                let unsmooth = self.unsmooth.as_ref().map_or(1.0, |u| u[i]);
                *v = self.scales[o] * f32::from(q) * unsmooth;
            }
        }
        w
    }
}

/// Where weight `(o, i)` lies in the packed panels, each `panel_len` long.
fn packed_index(panel_len: usize, o: usize, i: usize) -> usize {
    (o / PANEL) * panel_len + (i / GROUP) * PANEL * GROUP + (o % PANEL) * GROUP + i % GROUP
}

/// The scale `max |v| / 127` of `values` and its inverse (both zero for an all-zero or non-finite row).
fn scale_of(values: &[f32]) -> (f32, f32) {
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max > 0.0 && max.is_finite() {
        (max / 127.0, 127.0 / max)
    } else {
        (0.0, 0.0)
    }
}

/// `v / scale` rounded to the nearest integer (ties to even, as the vector units round) in [-127, 127].
fn quantize(v: f32, inverse: f32) -> i8 {
    // `as` saturates and maps NaN to 0.
    ((v * inverse).round_ties_even() as i32).clamp(-127, 127) as i8
}

/// Rows quantised for a product: `u` per input, each row padded to whole groups (the padding meets zero
/// weights).
struct QuantRows {
    data: Vec<u8>,
    scales: Vec<f32>,
    /// `z` per row.
    zeros: Vec<i32>,
    /// Bytes per row: `k` rounded up to [`GROUP`].
    stride: usize,
}

/// Rows from which quantisation splits across rayon's pool.
const PARALLEL_ROWS: usize = if cfg!(miri) { 8 } else { 64 };

fn quantize_rows(x: &[f32], rows: usize, k: usize, unsmooth: Option<&[f32]>) -> QuantRows {
    let stride = k.div_ceil(GROUP) * GROUP;
    let mut data = vec![0u8; rows * stride];
    let mut params = vec![(0f32, 0i32); rows];
    // One row: its input, its bytes, its (scale, zero point).
    type Row<'a> = (&'a [f32], (&'a mut [u8], &'a mut (f32, i32)));
    let one = |(row, (out, params)): Row| *params = quantize_row(row, out, unsmooth);
    let (inputs, outputs) = (
        x.chunks_exact(k.max(1)),
        data.chunks_exact_mut(stride.max(1)),
    );
    if rows >= PARALLEL_ROWS && k > 0 {
        x.par_chunks_exact(k)
            .zip(data.par_chunks_exact_mut(stride).zip(params.par_iter_mut()))
            .for_each(one);
    } else {
        inputs.zip(outputs.zip(params.iter_mut())).for_each(one);
    }
    let (scales, zeros) = params.into_iter().unzip();
    QuantRows {
        data,
        scales,
        zeros,
        stride,
    }
}

/// Quantises `row` (each value times `unsmooth`'s, where given) into the first `row.len()` bytes of `out`;
/// returns the row's scale and zero point.
fn quantize_row(row: &[f32], out: &mut [u8], unsmooth: Option<&[f32]>) -> (f32, i32) {
    debug_assert!(out.len() >= row.len() && unsmooth.is_none_or(|u| u.len() == row.len()));
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    if available() {
        // SAFETY: `available` checked AVX-512F and BW; `out` and `unsmooth` hold at least `row.len()` values.
        return unsafe { quantize_row_avx512(row, out, unsmooth) };
    }
    quantize_row_scalar(row, out, unsmooth)
}

/// The scale and zero point of a row whose values lie in `[min, max]` (zero included), and the scale's
/// inverse; all zero for an all-zero or non-finite row.
fn row_params(min: f32, max: f32) -> (f32, i32, f32) {
    let (min, max) = (min.min(0.0), max.max(0.0));
    let scale = (max - min) / 255.0;
    if !(scale > 0.0 && scale.is_finite()) {
        return (0.0, 0, 0.0);
    }
    let inverse = 1.0 / scale;
    (
        scale,
        ((-min * inverse).round_ties_even() as i32).clamp(0, 255),
        inverse,
    )
}

fn quantize_row_scalar(row: &[f32], out: &mut [u8], unsmooth: Option<&[f32]>) -> (f32, i32) {
    let smoothed: Vec<f32>;
    let row = match unsmooth {
        Some(u) => {
            smoothed = row.iter().zip(u).map(|(v, u)| v * u).collect();
            &smoothed
        }
        None => row,
    };
    let min = row.iter().fold(0f32, |m, &v| m.min(v));
    let max = row.iter().fold(0f32, |m, &v| m.max(v));
    let (scale, zero, inverse) = row_params(min, max);
    for (u, &v) in out.iter_mut().zip(row) {
        // `as` saturates and maps NaN to 0.
        *u = ((v * inverse).round_ties_even() as i32 + zero).clamp(0, 255) as u8;
    }
    (scale, zero)
}

/// [`quantize_row_scalar`] sixteen values at a time (`vcvtps2dq` rounds to nearest, ties to even, as
/// the scalar code does).
///
/// # Safety
/// AVX-512F and BW must be available, and `out` and `unsmooth` must hold at least `row.len()` values.
#[cfg(all(target_arch = "x86_64", not(miri)))]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(row: &[f32], out: &mut [u8], unsmooth: Option<&[f32]>) -> (f32, i32) {
    use std::arch::x86_64::{
        _mm512_add_epi32, _mm512_cvtps_epi32, _mm512_mask_cvtepi32_storeu_epi8, _mm512_max_epi32,
        _mm512_max_ps, _mm512_min_epi32, _mm512_min_ps, _mm512_reduce_max_ps, _mm512_reduce_min_ps,
        _mm512_setzero_ps,
    };
    let n = row.len();
    let lanes = |from: usize| -> u16 {
        match n - from {
            16.. => u16::MAX,
            left => (1u16 << left) - 1,
        }
    };
    // SAFETY: AVX-512F and BW are available; loads are masked to the first `n` values of `row` and
    // `unsmooth`, stores to `out`'s first `n` bytes (this function's contract).
    unsafe {
        let load = |c: usize, mask: u16| {
            let v = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(c));
            match unsmooth {
                Some(u) => _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, u.as_ptr().add(c))),
                None => v,
            }
        };
        // Masked lanes load as zero, which the range includes anyway.
        let (mut min, mut max) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for c in (0..n).step_by(16) {
            let v = load(c, lanes(c));
            min = _mm512_min_ps(min, v);
            max = _mm512_max_ps(max, v);
        }
        let (scale, zero, inverse) =
            row_params(_mm512_reduce_min_ps(min), _mm512_reduce_max_ps(max));
        if scale == 0.0 {
            out[..n].fill(0);
            return (0.0, 0);
        }
        let inverse = _mm512_set1_ps(inverse);
        let (low, high, offset) = (
            _mm512_set1_epi32(0),
            _mm512_set1_epi32(255),
            _mm512_set1_epi32(zero),
        );
        for c in (0..n).step_by(16) {
            let mask = lanes(c);
            let q = _mm512_cvtps_epi32(_mm512_mul_ps(load(c, mask), inverse));
            let u = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(q, offset), low), high);
            _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(c).cast(), mask, u);
        }
        (scale, zero)
    }
}

/// `out[rows × n] = x[rows × k] · Wᵀ + b` with `x` quantised per row and `W` as [`QuantWeight`], on the VNNI
/// kernel where [`available`], else on a scalar loop that computes the same sums (tests, Miri).
pub fn linear(x: &[f32], rows: usize, w: &QuantWeight, bias: Option<&[f32]>, out: &mut [f32]) {
    let (n, k) = w.dims();
    assert_eq!(
        Some(x.len()),
        rows.checked_mul(k),
        "int8 linear: x is not rows × k"
    );
    assert_eq!(
        Some(out.len()),
        rows.checked_mul(n),
        "int8 linear: out is not rows × n"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "int8 linear: bias is not n long");
    }
    if rows == 0 || n == 0 {
        return;
    }
    let a = quantize_rows(x, rows, k, w.unsmooth.as_deref());
    let panels = n.div_ceil(PANEL);
    let row_tasks = rows.div_ceil(TASK_ROWS);
    let threads = if rows * n * k >= PARALLEL_WORK {
        rayon::current_num_threads()
    } else {
        1
    };
    // Few rows (one short sequence): split the panels too, so every thread has work.
    let panel_tasks = if threads > 1 {
        (2 * threads).div_ceil(row_tasks).clamp(1, panels)
    } else {
        1
    };
    let panels_per_task = panels.div_ceil(panel_tasks);
    let panel_tasks = panels.div_ceil(panels_per_task);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let task = |t: usize| {
        let (r, p) = (t / panel_tasks, t % panel_tasks);
        let rows_range = r * TASK_ROWS..rows.min((r + 1) * TASK_ROWS);
        let panel_range = p * panels_per_task..panels.min((p + 1) * panels_per_task);
        // SAFETY: tasks cover disjoint rows × panels of `out`, which is `rows × n` (asserted above) and
        // outlives the tasks; `a` and `w` are sized for these rows and panels.
        unsafe { block(rows_range, panel_range, &a, w, bias, out_ptr, n) };
    };
    if threads > 1 && row_tasks * panel_tasks > 1 {
        (0..row_tasks * panel_tasks).into_par_iter().for_each(task);
    } else {
        (0..row_tasks * panel_tasks).for_each(task);
    }
}

/// The output's first element, shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only written through inside `linear`'s tasks, at disjoint elements, while the
// buffer it points into is borrowed mutably by `linear`.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send` above.
unsafe impl Sync for SendPtr {}

/// Rows `rows` × panels `panels` of the result, tile by tile.
///
/// # Safety
/// `out` points to a `[total_rows × n]` buffer that holds `rows`, no other thread touches this region, and
/// `a` holds `rows`.
unsafe fn block(
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    a: &QuantRows,
    w: &QuantWeight,
    bias: Option<&[f32]>,
    out: SendPtr,
    n: usize,
) {
    let groups = w.k.div_ceil(GROUP);
    let panel_len = groups * PANEL * GROUP;
    for p in panels {
        let c0 = p * PANEL;
        let width = PANEL.min(n - c0);
        let tile = Tile {
            panel: &w.packed[p * panel_len..(p + 1) * panel_len],
            scales: &w.scales[c0..c0 + width],
            sums: &w.sums[c0..c0 + width],
            bias: bias.map(|b| &b[c0..c0 + width]),
            groups,
        };
        let mut r = rows.start;
        while r < rows.end {
            let height = TILE_ROWS.min(rows.end - r);
            let a_rows = &a.data[r * a.stride..(r + height) * a.stride];
            let x_scales = &a.scales[r..r + height];
            let x_zeros = &a.zeros[r..r + height];
            // SAFETY: rows `r .. r + height`, columns `c0 .. c0 + width` lie inside `out` (this function's
            // contract), rows `n` apart.
            let out_tile = unsafe { out.0.add(r * n + c0) };
            // SAFETY: as above; the tile's operands are sized for `height` rows and `width` columns.
            unsafe { tile.run(height, a_rows, a.stride, (x_scales, x_zeros), out_tile, n) };
            r += height;
        }
    }
}

/// One panel's operands.
struct Tile<'a> {
    panel: &'a [i8],
    scales: &'a [f32],
    sums: &'a [i32],
    bias: Option<&'a [f32]>,
    groups: usize,
}

impl Tile<'_> {
    /// `height` (≤ [`TILE_ROWS`]) rows of this panel's outputs.
    ///
    /// # Safety
    /// `out` points to `height` rows, `out_stride` apart, of at least `self.scales.len()` writable values
    /// that no other thread touches.
    unsafe fn run(
        &self,
        height: usize,
        a: &[u8],
        a_stride: usize,
        (x_scales, x_zeros): (&[f32], &[i32]),
        out: *mut f32,
        out_stride: usize,
    ) {
        debug_assert!(a.len() >= height * a_stride && a_stride >= self.groups * GROUP);
        if !cfg!(miri) && available() {
            macro_rules! heights {
                ($($h:literal)*) => {
                    match height {
                        // SAFETY: VNNI is available, and the operands are sized as `vnni` needs (checked
                        // above and by this function's contract).
                        $($h => unsafe {
                            self.vnni::<$h>(a, a_stride, (x_scales, x_zeros), out, out_stride)
                        },)*
                        _ => unreachable!("tile height {height} is outside 1..={TILE_ROWS}"),
                    }
                };
            }
            heights!(1 2 3 4 5 6)
        } else {
            // SAFETY: this function's contract.
            unsafe { self.scalar(height, a, a_stride, (x_scales, x_zeros), out, out_stride) }
        }
    }

    /// The sums the slow way, then the same dequantisation: the reference the vector kernel equals.
    ///
    /// # Safety
    /// As for [`Self::run`].
    unsafe fn scalar(
        &self,
        height: usize,
        a: &[u8],
        a_stride: usize,
        (x_scales, x_zeros): (&[f32], &[i32]),
        out: *mut f32,
        out_stride: usize,
    ) {
        for row in 0..height {
            for c in 0..self.scales.len() {
                let mut sum = 0i32;
                for g in 0..self.groups {
                    for i in 0..GROUP {
                        let u = i32::from(a[row * a_stride + g * GROUP + i]);
                        let q = i32::from(self.panel[g * PANEL * GROUP + c * GROUP + i]);
                        sum += u * q;
                    }
                }
                let value =
                    (sum - x_zeros[row] * self.sums[c]) as f32 * self.scales[c] * x_scales[row]
                        + self.bias.map_or(0.0, |b| b[c]);
                // SAFETY: (row, c) is inside the tile (this function's contract).
                unsafe { *out.add(row * out_stride + c) = value };
            }
        }
    }

    /// # Safety
    /// AVX-512F, BW and VNNI must be available; `R` rows of `a` hold `self.groups` groups; as for
    /// [`Self::run`].
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn vnni<const R: usize>(
        &self,
        a: &[u8],
        a_stride: usize,
        (x_scales, x_zeros): (&[f32], &[i32]),
        out: *mut f32,
        out_stride: usize,
    ) {
        // SAFETY: the CPU has the features (this function's contract); every unmasked load reads inside
        // `self.panel` (whole panels of `groups` groups) or `a` (rows of `a_stride ≥ groups · GROUP`
        // bytes); masked loads and stores touch only the tile's `width` columns.
        unsafe {
            let mut sums: [[__m512i; 4]; R] = [[_mm512_setzero_si512(); 4]; R];
            let mut w = self.panel.as_ptr();
            let mut x = a.as_ptr();
            for _ in 0..self.groups {
                let w0 = _mm512_loadu_si512(w.cast());
                let w1 = _mm512_loadu_si512(w.add(64).cast());
                let w2 = _mm512_loadu_si512(w.add(128).cast());
                let w3 = _mm512_loadu_si512(w.add(192).cast());
                for (row, sum) in sums.iter_mut().enumerate() {
                    let four = x.add(row * a_stride).cast::<i32>().read_unaligned();
                    let u = _mm512_set1_epi32(four);
                    sum[0] = _mm512_dpbusd_epi32(sum[0], u, w0);
                    sum[1] = _mm512_dpbusd_epi32(sum[1], u, w1);
                    sum[2] = _mm512_dpbusd_epi32(sum[2], u, w2);
                    sum[3] = _mm512_dpbusd_epi32(sum[3], u, w3);
                }
                w = w.add(PANEL * GROUP);
                x = x.add(GROUP);
            }
            let width = self.scales.len();
            for quarter in 0..4 {
                let c = quarter * 16;
                if c >= width {
                    break;
                }
                let mask: u16 = if width - c >= 16 {
                    u16::MAX
                } else {
                    (1u16 << (width - c)) - 1
                };
                let scale = _mm512_maskz_loadu_ps(mask, self.scales.as_ptr().add(c));
                let weight_sums = _mm512_maskz_loadu_epi32(mask, self.sums.as_ptr().add(c));
                let bias = match self.bias {
                    Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(c)),
                    None => _mm512_set1_ps(0.0),
                };
                for (row, sum) in sums.iter().enumerate() {
                    let offset = _mm512_mullo_epi32(_mm512_set1_epi32(x_zeros[row]), weight_sums);
                    let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum[quarter], offset));
                    let row_scale = _mm512_mul_ps(scale, _mm512_set1_ps(x_scales[row]));
                    let value = _mm512_fmadd_ps(exact, row_scale, bias);
                    _mm512_mask_storeu_ps(out.add(row * out_stride + c), mask, value);
                }
            }
        }
    }

    /// Never called: [`available`] is false off x86-64 and under Miri.
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    unsafe fn vnni<const R: usize>(
        &self,
        _: &[u8],
        _: usize,
        _: (&[f32], &[i32]),
        _: *mut f32,
        _: usize,
    ) {
        unreachable!("the VNNI kernel runs only on x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The product in exact integers from the original weights, quantised here without the packing, then
    /// scaled in f64: the kernel must equal it up to f32 rounding of the final scaling.
    fn reference(
        x: &[f32],
        rows: usize,
        w: &[f32],
        (n, k): (usize, usize),
        bias: Option<&[f32]>,
    ) -> Vec<f64> {
        let a = quantize_rows(x, rows, k, None);
        let mut out = vec![0f64; rows * n];
        for o in 0..n {
            let row = &w[o * k..(o + 1) * k];
            let (w_scale, inverse) = scale_of(row);
            for m in 0..rows {
                let mut sum = 0i64;
                for (i, &v) in row.iter().enumerate() {
                    let p = i64::from(a.data[m * a.stride + i]) - i64::from(a.zeros[m]);
                    sum += p * i64::from(quantize(v, inverse));
                }
                out[m * n + o] = sum as f64 * f64::from(w_scale) * f64::from(a.scales[m])
                    + bias.map_or(0.0, |b| f64::from(b[o]));
            }
        }
        out
    }

    fn check(rows: usize, n: usize, k: usize, seed: u64, with_bias: bool) {
        let mut rng = Rng::new(seed);
        let w = rng.uniform(n * k, 0.2);
        let x = rng.uniform(rows * k, 3.0);
        let bias = with_bias.then(|| rng.uniform(n, 0.5));
        let qw = QuantWeight::new(&w, n, k);
        let mut out = vec![f32::NAN; rows * n];
        linear(&x, rows, &qw, bias.as_deref(), &mut out);
        let want = reference(&x, rows, &w, (n, k), bias.as_deref());
        for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
            let tol = 1e-5 * want.abs().max(1.0);
            assert!(
                (f64::from(got) - want).abs() <= tol,
                "{rows}×{n}×{k} element {i}: {got} vs {want}"
            );
        }
    }

    /// Odd sizes at every edge: rows that fill no tile, one tile, tiles plus a remainder; outputs narrower
    /// than a vector, a panel plus one, several panels; inputs that are no whole group.
    #[test]
    fn equals_the_exact_integer_product_at_tile_edges() {
        // Miri interprets every step: it takes the sizes that cross each edge once.
        let (all_rows, all_n, all_k): (&[usize], &[usize], &[usize]) = if cfg!(miri) {
            (&[1, 7], &[17, 65], &[3, 37])
        } else {
            (
                &[1, 5, 6, 7, 13, 49],
                &[1, 15, 17, 64, 65, 130],
                &[1, 3, 4, 7, 37, 384],
            )
        };
        let mut seed = 1;
        for &rows in all_rows {
            for &n in all_n {
                for &k in all_k {
                    check(rows, n, k, seed, seed % 2 == 0);
                    seed += 1;
                }
            }
        }
    }

    /// Large enough to split across tasks: one and two threads give the same result as the reference.
    #[test]
    fn one_and_two_threads_agree_with_the_reference() {
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                if cfg!(miri) {
                    check(13, 70, 20, 7, true);
                } else {
                    check(97, 384, 384, 7, true);
                    check(3, 1536, 384, 8, true);
                }
            });
        }
    }

    /// The vector quantisation of a row equals the scalar one (lengths around the vector width).
    #[test]
    fn vector_and_scalar_quantisation_agree() {
        for n in [1, 15, 16, 17, 384, 1000] {
            let x = Rng::new(n as u64).uniform(n, 4.0);
            let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
            assert_eq!(
                quantize_row(&x, &mut a, None),
                quantize_row_scalar(&x, &mut b, None),
                "{n}"
            );
            assert_eq!(a, b, "{n}");
            let unsmooth = Rng::new(n as u64 + 1).uniform(n, 2.0);
            assert_eq!(
                quantize_row(&x, &mut a, Some(&unsmooth)),
                quantize_row_scalar(&x, &mut b, Some(&unsmooth)),
                "{n} smoothed"
            );
            assert_eq!(a, b, "{n}");
        }
        let (mut a, mut b) = (vec![0u8; 3], vec![0u8; 3]);
        assert_eq!(
            quantize_row(&[0.0; 3], &mut a, None),
            quantize_row_scalar(&[0.0; 3], &mut b, None)
        );
        assert_eq!(a, b);
    }

    /// Largest error of the int8 product against the exact f32 one, relative to the largest output.
    fn error(x: &[f32], rows: usize, w: &[f32], (n, k): (usize, usize), qw: &QuantWeight) -> f64 {
        let mut out = vec![0f32; rows * n];
        linear(x, rows, qw, None, &mut out);
        let mut worst: f64 = 0.0;
        let mut largest: f64 = 0.0;
        for m in 0..rows {
            for o in 0..n {
                let exact: f64 = (0..k)
                    .map(|i| f64::from(x[m * k + i]) * f64::from(w[o * k + i]))
                    .sum();
                worst = worst.max((exact - f64::from(out[m * n + o])).abs());
                largest = largest.max(exact.abs());
            }
        }
        worst / largest
    }

    /// With a few input channels far larger than the rest (as BERT's LayerNorm outputs have), smoothing
    /// makes the product more exact, and the smoothed weight still dequantises to the original.
    #[test]
    fn smoothing_tames_outlier_channels() {
        let (rows, n, k) = (16, 96, 128);
        let mut rng = Rng::new(11);
        let w = rng.uniform(n * k, 0.1);
        let mut x = rng.uniform(rows * k, 1.0);
        let mut range = vec![1.0f32; k];
        for j in [3, 77] {
            range[j] = 60.0;
            for m in 0..rows {
                x[m * k + j] *= 60.0;
            }
        }
        let plain = QuantWeight::new(&w, n, k);
        let smooth = QuantWeight::smoothed(&w, n, k, &range);
        let (before, after) = (
            error(&x, rows, &w, (n, k), &plain),
            error(&x, rows, &w, (n, k), &smooth),
        );
        assert!(
            after < before / 2.0,
            "smoothing left the error at {after} (from {before})"
        );
        let back = smooth.dequantized();
        let worst = w
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 5e-3,
            "dequantised smoothed weight off by {worst} (weights up to 0.1)"
        );
    }

    /// A merged delta lands on the weight the int8 one stands for, and the smoothing stays.
    #[test]
    fn adding_a_delta_keeps_the_smoothing() {
        let (n, k) = (20, 36);
        let mut rng = Rng::new(5);
        let (w, delta) = (rng.uniform(n * k, 0.1), rng.uniform(n * k, 0.02));
        let range: Vec<f32> = (0..k)
            .map(|j| if j % 7 == 0 { 40.0 } else { 1.0 })
            .collect();
        let smooth = QuantWeight::smoothed(&w, n, k, &range);
        let added = smooth.plus(&delta);
        assert_eq!(added.unsmooth, smooth.unsmooth);
        let back = added.dequantized();
        for ((w, d), b) in w.iter().zip(&delta).zip(&back) {
            assert!((w + d - b).abs() < 5e-3, "{w} + {d} came back as {b}");
        }
    }

    /// The quantisation itself: per-channel weights and per-row inputs come back within half a step, and a
    /// zero row stays zero.
    #[test]
    fn quantisation_is_within_half_a_step() {
        let mut rng = Rng::new(3);
        let (n, k) = (70, 45);
        let mut w = rng.uniform(n * k, 1.0);
        w[..k].iter_mut().for_each(|v| *v = 0.0);
        let qw = QuantWeight::new(&w, n, k);
        for (o, (row, back)) in w.chunks(k).zip(qw.dequantized().chunks(k)).enumerate() {
            let step = qw.scales[o];
            for (a, b) in row.iter().zip(back) {
                assert!((a - b).abs() <= step / 2.0 + 1e-7, "output {o}: {a} vs {b}");
            }
        }
        assert!(qw.dequantized()[..k].iter().all(|&v| v == 0.0));
        let x = vec![0.0; 2 * k];
        let mut out = vec![1.0; 2 * n];
        linear(&x, 2, &qw, None, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
    }
}
